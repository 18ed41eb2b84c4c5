// SHA-256 of a file, to check export files against their manifest entries (FIPS 180-4).
#pragma once

#include <string>

namespace cbart {
std::string sha256_hex(const std::string& data);
std::string sha256_file(const std::string& path);
}  // namespace cbart
