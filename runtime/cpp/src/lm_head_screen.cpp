#include "lm_head_screen.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "cbart/runtime.hpp"

namespace cbart {
namespace {

constexpr double kActivationError = 1.0 / 127.0;  // see runtime/lm_head_screen.py
constexpr double kMaxCandidateFraction = 0.25;
constexpr float kNegativeInfinity = -std::numeric_limits<float>::infinity();

// "(50265, 768)" after "'shape':" in an .npy header -> {50265, 768}.
std::vector<int64_t> header_shape(const std::string& header, const std::string& path) {
  const size_t key = header.find("'shape':");
  const size_t open = header.find('(', key), close = header.find(')', open);
  if (key == std::string::npos || open == std::string::npos || close == std::string::npos) {
    throw Error(path + ": no shape in its .npy header; re-run `cbart export`");
  }
  std::vector<int64_t> shape;
  const char* cursor = header.c_str() + open + 1;
  const char* end = header.c_str() + close;
  while (cursor < end) {
    char* next = nullptr;
    const long long value = std::strtoll(cursor, &next, 10);
    if (next == cursor) break;
    shape.push_back(value);
    cursor = next;
    while (cursor < end && (*cursor == ',' || *cursor == ' ')) ++cursor;
  }
  return shape;
}

}  // namespace

MappedMatrix::MappedMatrix(const std::string& path) {
  const int descriptor = ::open(path.c_str(), O_RDONLY);
  if (descriptor < 0) throw Error("cannot open " + path + "; re-run `cbart export`");
  struct stat info {};
  ::fstat(descriptor, &info);
  mapped_bytes_ = static_cast<size_t>(info.st_size);
  mapping_ = mapped_bytes_ ? ::mmap(nullptr, mapped_bytes_, PROT_READ, MAP_PRIVATE, descriptor, 0) : MAP_FAILED;
  ::close(descriptor);
  if (mapping_ == MAP_FAILED) {
    mapping_ = nullptr;
    throw Error("cannot map " + path);
  }
  const auto* bytes = static_cast<const unsigned char*>(mapping_);
  if (mapped_bytes_ < 10 || std::memcmp(bytes, "\x93NUMPY", 6) != 0) throw Error(path + " is not an .npy file");
  const size_t length_bytes = bytes[6] == 1 ? 2 : 4;
  size_t header_length = 0;
  for (size_t i = 0; i < length_bytes; ++i) header_length |= static_cast<size_t>(bytes[8 + i]) << (8 * i);
  const size_t offset = 8 + length_bytes + header_length;
  const std::string header(reinterpret_cast<const char*>(bytes + 8 + length_bytes), header_length);
  const std::vector<int64_t> shape = header_shape(header, path);
  if (header.find("'<f4'") == std::string::npos || header.find("'fortran_order': False") == std::string::npos ||
      shape.size() != 2) {
    throw Error(path + " is not a C-order 2-D float32 .npy file; re-run `cbart export`");
  }
  rows_ = shape[0];
  cols_ = shape[1];
  if (offset + static_cast<size_t>(rows_ * cols_) * sizeof(float) > mapped_bytes_) throw Error(path + " is truncated");
  data_ = reinterpret_cast<const float*>(bytes + offset);
}

MappedMatrix::~MappedMatrix() {
  if (mapping_) ::munmap(mapping_, mapped_bytes_);
}

LogitScreen::LogitScreen(const std::string& directory, const std::string& rows_file, const std::string& bounds_file)
    : weights_(directory + "/" + rows_file), bounds_(directory + "/" + bounds_file) {
  if (bounds_.rows() != 3 || bounds_.cols() != weights_.rows()) {
    throw Error(directory + ": " + bounds_file + " does not match " + rows_file + "; re-run `cbart export`");
  }
  const double unit = std::numeric_limits<float>::epsilon() / 2.0;
  const double width = static_cast<double>(weights_.cols());
  rounding_ = 4 * width * unit / (1 - width * unit);
  max_candidates_ = std::max<size_t>(64, static_cast<size_t>(kMaxCandidateFraction * weights_.rows()));
}

float LogitScreen::exact(int64_t token, const float* hidden) const {
  const float* weights = weights_.row(token);
  double sum = 0.0;
  for (int64_t i = 0; i < weights_.cols(); ++i) sum += static_cast<double>(weights[i]) * hidden[i];
  return static_cast<float>(sum + bounds_.row(0)[token]);
}

void LogitScreen::refine(std::vector<float>& scores, const std::vector<float>& hidden,
                         const std::vector<float>& residual, int64_t rows) const {
  const int64_t vocab = weights_.rows(), width = weights_.cols();
  const float *bias = bounds_.row(0), *residual_l2 = bounds_.row(1), *abs_l1 = bounds_.row(2);
  const double unit = std::numeric_limits<float>::epsilon() / 2.0;
  std::vector<float> radius(static_cast<size_t>(vocab));
  std::vector<int64_t> candidates;
  for (int64_t row = 0; row < rows; ++row) {
    float* values = scores.data() + row * vocab;
    const float* h = hidden.data() + row * width;
    const float* r = residual.data() + row * width;
    double norm = 0.0, peak_residual = 0.0, peak_hidden = 0.0;
    for (int64_t i = 0; i < width; ++i) {
      norm += static_cast<double>(r[i]) * r[i];
      peak_residual = std::max(peak_residual, std::fabs(static_cast<double>(r[i])));
      peak_hidden = std::max(peak_hidden, std::fabs(static_cast<double>(h[i])));
    }
    norm = std::sqrt(norm);
    const double activation = peak_residual * kActivationError + peak_hidden * rounding_;
    float best_lower = kNegativeInfinity;
    for (int64_t token = 0; token < vocab; ++token) {
      radius[token] = static_cast<float>(norm * residual_l2[token] + activation * abs_l1[token] +
                                         4 * unit * std::fabs(bias[token]));
      best_lower = std::max(best_lower, values[token] - radius[token]);
    }
    candidates.clear();
    for (int64_t token = 0; token < vocab; ++token) {
      if (values[token] + radius[token] >= best_lower) candidates.push_back(token);
    }
    if (candidates.size() > max_candidates_) {  // a flat distribution: every finite logit
      candidates.clear();
      for (int64_t token = 0; token < vocab; ++token) {
        if (std::isfinite(values[token])) candidates.push_back(token);
      }
    }
    std::fill(radius.begin(), radius.end(), kNegativeInfinity);  // reused as the refined row
    for (int64_t token : candidates) radius[token] = exact(token, h);
    std::copy(radius.begin(), radius.end(), values);
  }
}

}  // namespace cbart
