// Input preparation and generation settings, mirrored check for check from runtime/generator.py
// (`_pad` and `settings()`): what a request may ask for and how it becomes what the search reads.
#pragma once

#include <cstdint>
#include <vector>

#include "cbart/runtime.hpp"
#include "manifest.hpp"
#include "search.hpp"

namespace cbart {

// The manifest's generation defaults (the checkpoint's) updated by the request's options; max_new_tokens
// (either) takes precedence over max_length and min_new_tokens over min_length, as in transformers' generate().
SearchSettings resolve_settings(const Manifest& manifest, const GenerationOptions& options);

struct PaddedInputs {
  std::vector<int64_t> ids, mask;  // rows x width, right-padded
  int64_t rows = 0, width = 0;
  int truncated = 0;  // inputs cut to the model's maximum length
};

// Empty inputs and ids outside the vocabulary are refused; an input longer than the model's maximum is
// truncated to it with EOS kept last (`truncation`) or refused.
PaddedInputs pad_inputs(const Manifest& manifest, std::vector<Sequence> inputs, bool truncation);

}  // namespace cbart
