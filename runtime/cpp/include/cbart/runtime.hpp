// cbart C++ runtime: generation through a `cbart export` directory, token ids in, token ids out.
//
// The same export directory and the same generation semantics as the Python runtime (transformers'
// generate()): greedy search and beam search with length penalty, early stopping, no-repeat-ngram,
// repetition penalty and min/max length; batches of mixed lengths are padded inside; the
// cross-attention K/V is computed once per request and shared by all beams of a source.
// Tokenization stays with the caller.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace cbart {

using Sequence = std::vector<int64_t>;

// Every error the runtime reports: a message that names the problem and the fix.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// transformers' generation parameters; unset values come from the export's manifest defaults.
// Lengths count the decoder start token, as in transformers (max_new_tokens sets max_length = 1 + n).
struct GenerationOptions {
  std::optional<int> max_new_tokens, max_length, min_new_tokens, min_length, num_beams, no_repeat_ngram_size,
      num_return_sequences;
  std::optional<float> length_penalty, repetition_penalty;
  std::optional<std::string> early_stopping;  // "true", "false" or "never"
  // Sampling is not implemented here (the Python runtime has it); false overrides an export whose checkpoint
  // defaults to sampling (do_sample in its generation_config.json), which is refused otherwise.
  std::optional<bool> do_sample;
  // Inputs longer than the model's maximum are truncated to it, EOS kept last (GenerationResult::truncated
  // counts them), as in the Python runtime; false refuses them instead.
  std::optional<bool> truncation;
  // A pair export (cbart export FULL --draft DRAFT), greedy only: the draft proposes, the full model verifies;
  // the same token ids as plain greedy decoding. 0 adapts the proposals per verification; k > 0 fixes them.
  std::optional<int> speculative;
};

// What a speculative generation's draft bought (runtime/speculative.py's SpeculationStats).
struct SpeculationStats {
  int64_t full_calls = 0, draft_calls = 0, proposed = 0, accepted = 0, steps = 0;
};

struct RuntimeOptions {
  int threads = 0;                 // intra-op threads per graph; 0 = ONNX Runtime's default
  bool check_files = true;         // verify every file's sha256 against the manifest
  std::string onnxruntime_library; // path of libonnxruntime; empty = $CBART_ONNXRUNTIME_LIBRARY or the build's
};

struct GenerationResult {
  std::vector<Sequence> sequences;  // num_return_sequences consecutive rows per input
  double encode_ms = 0.0;
  double decode_ms = 0.0;
  std::optional<SpeculationStats> speculation;  // set by speculative generation
  std::vector<std::string> processors;          // the logits processors applied, in order (processors.hpp)
  int truncated = 0;                            // inputs truncated to the model's maximum length
};

class Runtime {
 public:
  // Reads DIR/manifest.json, checks the format version and (by default) every file's sha256, loads the graphs.
  static std::unique_ptr<Runtime> open(const std::string& directory, const RuntimeOptions& options = {});
  virtual ~Runtime() = default;

  virtual GenerationResult generate(const std::vector<Sequence>& inputs, const GenerationOptions& options = {}) = 0;
  virtual int64_t vocab_size() const = 0;
  virtual int64_t max_source_length() const = 0;  // longer inputs are truncated (or refused)
};

}  // namespace cbart
