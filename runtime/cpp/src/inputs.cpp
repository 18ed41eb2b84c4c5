#include "inputs.hpp"

#include <algorithm>
#include <string>

namespace cbart {

SearchSettings resolve_settings(const Manifest& manifest, const GenerationOptions& o) {
  SearchSettings s;
  s.eos = manifest.eos;
  s.pad = manifest.pad;
  s.decoder_start = manifest.decoder_start;
  s.forced_bos = manifest.forced_bos;
  s.forced_eos = manifest.forced_eos;
  // As runtime/generator.py's settings(): the manifest's defaults updated by the options; then max_new_tokens
  // (either) takes precedence over max_length, and min_new_tokens over min_length, as in generate().
  const std::optional<int> max_new = o.max_new_tokens ? o.max_new_tokens : manifest.max_new_tokens;
  const std::optional<int> min_new = o.min_new_tokens ? o.min_new_tokens : manifest.min_new_tokens;
  const std::optional<int> max_length = o.max_length ? o.max_length : manifest.max_length;
  if (!max_new && !max_length) {
    throw Error("this export's manifest carries no max_length (it was written by an older cbart); pass "
                "max_new_tokens or max_length, or re-export");
  }
  s.max_length = max_new ? *max_new + 1 : *max_length;
  s.min_length = min_new ? 0 : o.min_length.value_or(manifest.min_length);
  s.min_new_tokens = min_new.value_or(0);
  s.num_beams = o.num_beams.value_or(manifest.num_beams);
  s.no_repeat_ngram_size = o.no_repeat_ngram_size.value_or(manifest.no_repeat_ngram_size);
  s.num_return_sequences = o.num_return_sequences.value_or(manifest.num_return_sequences);
  if (o.do_sample.value_or(manifest.do_sample)) {
    throw Error("the C++ runtime does not sample (the export's generation defaults set do_sample); pass "
                "do_sample=false for greedy or beam search, or sample with the Python runtime");
  }
  s.length_penalty = o.length_penalty.value_or(manifest.length_penalty);
  s.repetition_penalty = o.repetition_penalty.value_or(manifest.repetition_penalty);
  const std::string stop = o.early_stopping.value_or(manifest.early_stopping);
  if (stop != "true" && stop != "false" && stop != "never") {
    throw Error("early_stopping must be true, false or \"never\", got " + stop);
  }
  s.early_stopping = stop == "true"    ? EarlyStopping::kTrue
                     : stop == "never" ? EarlyStopping::kNever
                                       : EarlyStopping::kFalse;
  if (s.max_length < 2) throw Error("max_length must allow at least one new token");
  if (s.num_beams < 1) throw Error("num_beams must be >= 1");
  if (s.num_return_sequences > std::max(1, s.num_beams) || (s.num_beams == 1 && s.num_return_sequences != 1)) {
    throw Error("num_return_sequences cannot exceed num_beams (greedy search returns one sequence)");
  }
  return s;
}

PaddedInputs pad_inputs(const Manifest& manifest, std::vector<Sequence> inputs, bool truncation) {
  PaddedInputs out;
  if (inputs.empty()) throw Error("empty input: pass at least one sequence of token ids");
  for (const auto& sequence : inputs) {
    if (sequence.empty()) throw Error("empty input: one of the inputs has no tokens");
  }
  for (const auto& sequence : inputs) {
    for (int64_t token : sequence) {
      if (token < 0 || token >= manifest.vocab_size) {
        throw Error("token id " + std::to_string(token) + " is outside the vocabulary (0.." +
                    std::to_string(manifest.vocab_size - 1) + ")");
      }
    }
  }
  const size_t limit = static_cast<size_t>(manifest.max_source_positions);
  size_t longest = 0;
  for (const auto& sequence : inputs) longest = std::max(longest, sequence.size());
  if (longest > limit && !truncation) {
    throw Error("input of " + std::to_string(longest) + " tokens exceeds the model's maximum of " +
                std::to_string(limit) + "; shorten it or pass truncation=true");
  }
  for (auto& sequence : inputs) {
    if (sequence.size() <= limit) continue;
    sequence.resize(limit);
    sequence.back() = manifest.eos;
    ++out.truncated;
  }
  size_t width = 0;
  for (const auto& sequence : inputs) width = std::max(width, sequence.size());
  out.ids.assign(inputs.size() * width, manifest.pad);
  out.mask.assign(inputs.size() * width, 0);
  for (size_t row = 0; row < inputs.size(); ++row) {
    std::copy(inputs[row].begin(), inputs[row].end(), out.ids.begin() + row * width);
    std::fill(out.mask.begin() + row * width, out.mask.begin() + row * width + inputs[row].size(), 1);
  }
  out.rows = static_cast<int64_t>(inputs.size());
  out.width = static_cast<int64_t>(width);
  return out;
}


}  // namespace cbart
