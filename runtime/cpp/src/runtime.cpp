// The Runtime facade: a request's settings and inputs (inputs.hpp), the encoder side once, then the search
// (greedy, beam, or speculative through a pair's draft) over ONNX Runtime decoder sessions (ort_backend.hpp).
#include <chrono>
#include <memory>

#include "cbart/runtime.hpp"
#include "inputs.hpp"
#include "ort_backend.hpp"
#include "processors.hpp"
#include "search.hpp"

namespace cbart {
namespace {

using Clock = std::chrono::steady_clock;

double milliseconds(Clock::time_point start, Clock::time_point end) {
  return std::chrono::duration<double, std::milli>(end - start).count();
}

class OrtRuntime final : public Runtime {
 public:
  OrtRuntime(const std::string& directory, const RuntimeOptions& options) : model_(directory, options) {}

  int64_t vocab_size() const override { return model_.manifest().vocab_size; }
  int64_t max_source_length() const override { return model_.manifest().max_source_positions; }

  GenerationResult generate(const std::vector<Sequence>& inputs, const GenerationOptions& options) override {
    const SearchSettings settings = resolve_settings(model_.manifest(), options);
    PaddedInputs padded = pad_inputs(model_.manifest(), inputs, options.truncation.value_or(true));
    const int64_t sources = padded.rows;
    const auto started = Clock::now();
    Ort::Value states = model_.encode(padded.ids, padded.mask, sources, padded.width);
    Ort::Value mask_value = model_.tensor(padded.mask, sources, padded.width);
    std::vector<Ort::Value> cross = model_.cross_kv(states);
    std::vector<Ort::Value> draft_cross;
    if (options.speculative) draft_cross = speculation_draft(settings).cross_kv(states);
    const auto encoded = Clock::now();
    const int64_t rows_per_source = settings.num_beams > 1 ? settings.num_beams : 1;
    OrtDecoderSession session(model_, cross, mask_value, sources * rows_per_source, settings.max_length);
    GenerationResult result;
    result.processors = names(logits_processors(settings));
    result.truncated = padded.truncated;
    if (options.speculative) {
      OrtDecoderSession proposer(*model_.draft(), draft_cross, mask_value, sources, settings.max_length);
      DraftLength draft_length = *options.speculative == 0 ? DraftLength()
                                                           : DraftLength(*options.speculative, *options.speculative, false);
      result.speculation = SpeculationStats{};
      result.sequences = speculative_greedy(session, proposer, sources, settings, draft_length, *result.speculation);
    } else {
      result.sequences = settings.num_beams > 1 ? beam_search(session, sources, settings)
                                                : greedy_search(session, sources, settings);
    }
    result.encode_ms = milliseconds(started, encoded);
    result.decode_ms = milliseconds(encoded, Clock::now());
    return result;
  }


 private:
  OrtModel& speculation_draft(const SearchSettings& settings) {
    if (!model_.draft()) {
      throw Error(model_.directory() + " has no draft decoder; speculative decoding needs a pair export: "
                  "cbart export FULL_CKPT --draft COMPRESSED_CKPT --out DIR");
    }
    if (settings.num_beams > 1) throw Error("speculative decoding is greedy; drop num_beams > 1, or speculative");
    return *model_.draft();
  }


  OrtModel model_;
};

}  // namespace

std::unique_ptr<Runtime> Runtime::open(const std::string& directory, const RuntimeOptions& options) {
  return std::make_unique<OrtRuntime>(directory, options);
}

}  // namespace cbart
