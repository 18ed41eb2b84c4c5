// The ONNX Runtime backend and the Runtime facade. ONNX Runtime is loaded at run time (dlopen +
// OrtGetApiBase, ORT_API_MANUAL_INIT), so one binary works with any library that offers the C API
// version of the headers it was compiled with or a newer one.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>

#include "cbart/runtime.hpp"
#include "contract.hpp"
#include "lm_head_screen.hpp"
#include "manifest.hpp"
#include "search.hpp"

#ifndef CBART_DEFAULT_ONNXRUNTIME_LIBRARY
#define CBART_DEFAULT_ONNXRUNTIME_LIBRARY "libonnxruntime.so"
#endif

namespace cbart {
namespace {

using Clock = std::chrono::steady_clock;

double milliseconds(Clock::time_point start, Clock::time_point end) {
  return std::chrono::duration<double, std::milli>(end - start).count();
}

// Loads libonnxruntime once per process and initialises the C++ API with its OrtApi.
const OrtApi* load_onnxruntime(const std::string& requested) {
  static std::mutex mutex;
  static const OrtApi* api = nullptr;
  std::lock_guard<std::mutex> lock(mutex);
  if (api) return api;
  std::string path = requested;
  if (path.empty()) {
    const char* from_env = std::getenv("CBART_ONNXRUNTIME_LIBRARY");
    path = from_env ? from_env : CBART_DEFAULT_ONNXRUNTIME_LIBRARY;
  }
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) {
    throw Error("cannot load ONNX Runtime from " + path + " (" + dlerror() +
                "); set CBART_ONNXRUNTIME_LIBRARY to libonnxruntime.so of an ONNX Runtime release");
  }
  using GetApiBase = const OrtApiBase* (*)();
  auto get_base = reinterpret_cast<GetApiBase>(dlsym(handle, "OrtGetApiBase"));
  if (!get_base) throw Error(path + " does not export OrtGetApiBase; is it an ONNX Runtime library?");
  api = get_base()->GetApi(ORT_API_VERSION);
  if (!api) {
    throw Error(std::string("the ONNX Runtime in ") + path + " (" + get_base()->GetVersionString() +
                ") is older than the C API version " + std::to_string(ORT_API_VERSION) + " this runtime was built with");
  }
  Ort::InitApi(api);
  return api;
}

std::vector<const char*> c_names(const std::vector<std::string>& names) {
  std::vector<const char*> out;
  for (const auto& name : names) out.push_back(name.c_str());
  return out;
}

class OrtModel;

// The self-attention cache of one request in two buffers allocated once, sized for its longest
// sequence. Each step reads the past from one side and ONNX Runtime writes the present straight into
// the other (IO binding onto views of the buffers), so no step allocates; beam reordering gathers
// rows across the two sides the same way. Cache tensor i of side s, at length t, is the contiguous
// [rows, heads, t, head_dim] prefix of its slot.
class KvBuffers {
 public:
  KvBuffers(int64_t tensors, int64_t rows, int64_t heads, int64_t capacity, int64_t head_dim)
      : tensors_(tensors), rows_(rows), heads_(heads), capacity_(capacity), head_dim_(head_dim),
        storage_{std::vector<float>(static_cast<size_t>(tensors * slot())),
                 std::vector<float>(static_cast<size_t>(tensors * slot()))} {}

  float* data(int side, int64_t tensor) { return storage_[side].data() + tensor * slot(); }

  Ort::Value view(const Ort::MemoryInfo& memory, int side, int64_t tensor, int64_t length) {
    if (length > capacity_) throw Error("internal error: the cache outgrew its preallocated length");
    std::vector<int64_t> shape{rows_, heads_, length, head_dim_};
    return Ort::Value::CreateTensor<float>(memory, data(side, tensor), static_cast<size_t>(row_size(length) * rows_),
                                           shape.data(), shape.size());
  }

  // Copies the first `kept` positions of side `from` (at `length`) into the other side (speculative rollback).
  void truncate(int from, int64_t length, int64_t kept) {
    const int64_t blocks = rows_ * heads_, size = kept * head_dim_;
    for (int64_t tensor = 0; tensor < tensors_; ++tensor) {
      const float* source = data(from, tensor);
      float* target = data(1 - from, tensor);
      for (int64_t block = 0; block < blocks; ++block) {
        std::memcpy(target + block * size, source + block * length * head_dim_, sizeof(float) * size);
      }
    }
  }

  // Copies rows `order` of side `from` (at `length`) into the other side, in that order.
  void gather(int from, int64_t length, const std::vector<int64_t>& order) {
    const int64_t size = row_size(length);
    for (int64_t tensor = 0; tensor < tensors_; ++tensor) {
      const float* source = data(from, tensor);
      float* target = data(1 - from, tensor);
      for (size_t row = 0; row < order.size(); ++row) {
        std::memcpy(target + row * size, source + order[row] * size, sizeof(float) * size);
      }
    }
  }

 private:
  int64_t slot() const { return rows_ * row_size(capacity_); }
  int64_t row_size(int64_t length) const { return heads_ * length * head_dim_; }

  int64_t tensors_, rows_, heads_, capacity_, head_dim_;
  std::vector<float> storage_[2];
};

class OrtDecoderSession final : public DecoderSession {
 public:
  OrtDecoderSession(OrtModel& model, std::vector<Ort::Value>& cross, Ort::Value& mask, int64_t rows,
                    int max_length);
  std::vector<float> step(const std::vector<int64_t>& tokens) override { return run(tokens, 1, true); }
  void reorder(const std::vector<int64_t>& rows) override;
  int64_t vocab() const override;
  bool screened() const override;
  std::vector<float> step_screened(const std::vector<int64_t>& tokens) override { return run(tokens, 1, false); }
  std::vector<float> step_all_screened(const std::vector<int64_t>& tokens, int64_t count) override {
    return run(tokens, count, false);
  }
  void refine(std::vector<float>& scores, int64_t position = 0) override;
  std::vector<float> step_all(const std::vector<int64_t>& tokens, int64_t count) override;
  std::vector<float> step_last(const std::vector<int64_t>& tokens, int64_t count) override;
  void truncate(int64_t length) override;

 private:
  std::vector<float> run(const std::vector<int64_t>& tokens, int64_t count, bool exact);

  OrtModel& model_;
  std::vector<Ort::Value>& cross_;
  Ort::Value& mask_;
  int64_t rows_;
  int64_t tensors_;
  KvBuffers cache_;
  int side_ = 0;        // which side of cache_ holds the past
  int64_t length_ = 0;  // tokens in the past
  std::vector<int64_t> ids_;
  std::vector<float> logits_;
  bool exact_logits_ = true;             // the screened LM head's switch, when the export has one
  std::vector<float> hidden_, residual_;  // its bound's inputs, written by screened steps
  int64_t screened_count_ = 1;            // new positions of the last screened step
};

class OrtModel final : public Runtime {
 public:
  // `draft`: a speculative pair's draft (no encoder graph), opened by the pair's full model.
  OrtModel(const std::string& directory, const RuntimeOptions& options, bool draft = false)
      : directory_(directory),
        manifest_(read_manifest(directory, options.check_files, draft)),
        env_((load_onnxruntime(options.onnxruntime_library), ORT_LOGGING_LEVEL_WARNING), "cbart"),
        memory_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)) {
    for (const auto& [name, file] : manifest_.graph_files) {
      Ort::SessionOptions session_options;
      session_options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
      session_options.SetInterOpNumThreads(1);
      if (options.threads > 0) session_options.SetIntraOpNumThreads(options.threads);
      // Spinning threads help the back-to-back decoder steps and hurt the once-per-request graphs.
      session_options.AddConfigEntry("session.intra_op.allow_spinning", name == "decoder_step" ? "1" : "0");
      const std::string path = directory + "/" + file;
      try {
        sessions_.emplace(name, Ort::Session(env_, path.c_str(), session_options));
      } catch (const Ort::Exception& error) {
        throw Error("ONNX Runtime could not load " + path + ": " + error.what());
      }
    }
    const auto& step_inputs = manifest_.inputs.at(DECODER_STEP);
    if (!manifest_.lm_head_rows.empty() &&
        std::find(step_inputs.begin(), step_inputs.end(), SWITCH) != step_inputs.end()) {
      screen_ = std::make_unique<LogitScreen>(directory, manifest_.lm_head_rows, manifest_.lm_head_bounds);
    }
    if (!manifest_.draft_directory.empty()) {
      draft_ = std::make_unique<OrtModel>(directory + "/" + manifest_.draft_directory, options, true);
    }
  }

  int64_t vocab_size() const override { return manifest_.vocab_size; }
  int64_t max_source_length() const override { return manifest_.max_source_positions; }

  GenerationResult generate(const std::vector<Sequence>& inputs, const GenerationOptions& options) override {
    const SearchSettings settings = resolve(options);
    std::vector<int64_t> ids, mask;
    const int64_t sources = static_cast<int64_t>(inputs.size());
    int truncated = 0;
    const int64_t width = pad(inputs, options.truncation.value_or(true), ids, mask, truncated);
    const auto started = Clock::now();
    std::vector<int64_t> shape{sources, width};
    Ort::Value ids_value = Ort::Value::CreateTensor<int64_t>(memory_, ids.data(), ids.size(), shape.data(), 2);
    Ort::Value mask_value = Ort::Value::CreateTensor<int64_t>(memory_, mask.data(), mask.size(), shape.data(), 2);
    std::vector<Ort::Value> states = run("encoder", {"input_ids", "attention_mask"}, {&ids_value, &mask_value});
    std::vector<Ort::Value> cross = cross_kv(states[0]);
    std::vector<Ort::Value> draft_cross;
    if (options.speculative) draft_cross = speculation_draft(settings).cross_kv(states[0]);
    const auto encoded = Clock::now();
    const int64_t rows_per_source = settings.num_beams > 1 ? settings.num_beams : 1;
    OrtDecoderSession session(*this, cross, mask_value, sources * rows_per_source, settings.max_length);
    GenerationResult result;
    result.processors = names(logits_processors(settings));
    result.truncated = truncated;
    if (options.speculative) {
      OrtDecoderSession proposer(*draft_, draft_cross, mask_value, sources, settings.max_length);
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

  // Runs `graph` on `values` bound to the input `names`; its outputs `output_names` (default: all, in the
  // manifest's order), in that order.
  std::vector<Ort::Value> run(const std::string& graph, const std::vector<std::string>& names,
                              const std::vector<Ort::Value*>& values, const std::vector<std::string>& outputs = {}) {
    std::vector<const char*> input_names = c_names(names);
    std::vector<const char*> output_names = c_names(outputs.empty() ? manifest_.outputs.at(graph) : outputs);
    std::vector<Ort::Value> inputs;
    inputs.reserve(values.size());
    for (Ort::Value* value : values) inputs.emplace_back(Ort::Value{value->operator OrtValue*()});
    auto results = sessions_.at(graph).Run(Ort::RunOptions{nullptr}, input_names.data(), inputs.data(),
                                           inputs.size(), output_names.data(), output_names.size());
    for (auto& borrowed : inputs) borrowed.release();  // the caller still owns these values
    return results;
  }

  // The autoencoder (when the model has one) and cross-K/V graphs on the encoder's output.
  // Returned in the order of cross_names(), the decoder step's cross inputs.
  std::vector<Ort::Value> cross_kv(Ort::Value& states) {
    if (!sessions_.count(AUTOENCODER)) return run(CROSS_KV, {"memory"}, {&states}, cross_names_);
    std::vector<Ort::Value> memory = run(AUTOENCODER, {"hidden_states"}, {&states});
    return run(CROSS_KV, {"memory"}, {&memory[0]}, cross_names_);
  }

  const std::vector<std::string>& past_names() const { return past_names_; }
  const std::vector<std::string>& present_names() const { return present_names_; }
  const std::vector<std::string>& cross_names() const { return cross_names_; }

  const Manifest& manifest() const { return manifest_; }
  Ort::Session& session(const std::string& graph) { return sessions_.at(graph); }
  const Ort::MemoryInfo& memory() const { return memory_; }
  const LogitScreen* screen() const { return screen_.get(); }

 private:
  SearchSettings resolve(const GenerationOptions& o) const {
    SearchSettings s;
    s.eos = manifest_.eos;
    s.pad = manifest_.pad;
    s.decoder_start = manifest_.decoder_start;
    s.forced_bos = manifest_.forced_bos;
    s.forced_eos = manifest_.forced_eos;
    // As runtime/generator.py's settings(): the manifest's defaults updated by the options; then max_new_tokens
    // (either) takes precedence over max_length, and min_new_tokens over min_length, as in generate().
    const std::optional<int> max_new = o.max_new_tokens ? o.max_new_tokens : manifest_.max_new_tokens;
    const std::optional<int> min_new = o.min_new_tokens ? o.min_new_tokens : manifest_.min_new_tokens;
    s.max_length = max_new ? *max_new + 1 : o.max_length.value_or(manifest_.max_length);
    s.min_length = min_new ? 0 : o.min_length.value_or(manifest_.min_length);
    s.min_new_tokens = min_new.value_or(0);
    s.num_beams = o.num_beams.value_or(manifest_.num_beams);
    s.no_repeat_ngram_size = o.no_repeat_ngram_size.value_or(manifest_.no_repeat_ngram_size);
    s.num_return_sequences = o.num_return_sequences.value_or(manifest_.num_return_sequences);
    if (o.do_sample.value_or(manifest_.do_sample)) {
      throw Error("the C++ runtime does not sample (the export's generation defaults set do_sample); pass "
                  "do_sample=false for greedy or beam search, or sample with the Python runtime");
    }
    s.length_penalty = o.length_penalty.value_or(manifest_.length_penalty);
    s.repetition_penalty = o.repetition_penalty.value_or(manifest_.repetition_penalty);
    const std::string stop = o.early_stopping.value_or(manifest_.early_stopping);
    if (stop != "true" && stop != "false" && stop != "never") {
      throw Error("early_stopping must be true, false or \"never\", got " + stop);
    }
    s.early_stopping = stop == "true" ? 1 : stop == "never" ? 2 : 0;
    if (s.max_length < 2) throw Error("max_length must allow at least one new token");
    if (s.num_beams < 1) throw Error("num_beams must be >= 1");
    if (s.num_return_sequences > std::max(1, s.num_beams) || (s.num_beams == 1 && s.num_return_sequences != 1)) {
      throw Error("num_return_sequences cannot exceed num_beams (greedy search returns one sequence)");
    }
    return s;
  }

  // As runtime/generator.py's _pad, check for check: empty inputs and ids outside the vocabulary are refused;
  // an input longer than the model's maximum is truncated to it with EOS kept last (`truncation`, the
  // default; counted in `truncated`) or refused.
  int64_t pad(std::vector<Sequence> inputs, bool truncation, std::vector<int64_t>& ids, std::vector<int64_t>& mask,
              int& truncated) const {
    if (inputs.empty()) throw Error("empty input: pass at least one sequence of token ids");
    for (const auto& sequence : inputs) {
      if (sequence.empty()) throw Error("empty input: one of the inputs has no tokens");
    }
    for (const auto& sequence : inputs) {
      for (int64_t token : sequence) {
        if (token < 0 || token >= manifest_.vocab_size) {
          throw Error("token id " + std::to_string(token) + " is outside the vocabulary (0.." +
                      std::to_string(manifest_.vocab_size - 1) + ")");
        }
      }
    }
    const size_t limit = static_cast<size_t>(manifest_.max_source_positions);
    size_t longest = 0;
    for (const auto& sequence : inputs) longest = std::max(longest, sequence.size());
    if (longest > limit && !truncation) {
      throw Error("input of " + std::to_string(longest) + " tokens exceeds the model's maximum of " +
                  std::to_string(limit) + "; shorten it or pass truncation=true");
    }
    truncated = 0;
    for (auto& sequence : inputs) {
      if (sequence.size() <= limit) continue;
      sequence.resize(limit);
      sequence.back() = manifest_.eos;
      ++truncated;
    }
    size_t width = 0;
    for (const auto& sequence : inputs) width = std::max(width, sequence.size());
    ids.assign(inputs.size() * width, manifest_.pad);
    mask.assign(inputs.size() * width, 0);
    for (size_t row = 0; row < inputs.size(); ++row) {
      std::copy(inputs[row].begin(), inputs[row].end(), ids.begin() + row * width);
      std::fill(mask.begin() + row * width, mask.begin() + row * width + inputs[row].size(), 1);
    }
    return static_cast<int64_t>(width);
  }

  OrtModel& speculation_draft(const SearchSettings& settings) {
    if (!draft_) {
      throw Error(directory_ + " has no draft decoder; speculative decoding needs a pair export: "
                  "cbart export FULL_CKPT --draft COMPRESSED_CKPT --out DIR");
    }
    if (settings.num_beams > 1) throw Error("speculative decoding is greedy; drop num_beams > 1, or speculative");
    return *draft_;
  }

  std::string directory_;
  Manifest manifest_;
  Ort::Env env_;
  Ort::MemoryInfo memory_;
  std::map<std::string, Ort::Session> sessions_;
  std::unique_ptr<LogitScreen> screen_;
  std::unique_ptr<OrtModel> draft_;
  std::vector<std::string> past_names_ = cache_names(PAST, manifest_.decoder_layers),
                           present_names_ = cache_names(PRESENT, manifest_.decoder_layers),
                           cross_names_ = cache_names(CROSS, manifest_.decoder_layers);
};

OrtDecoderSession::OrtDecoderSession(OrtModel& model, std::vector<Ort::Value>& cross, Ort::Value& mask,
                                     int64_t rows, int max_length)
    : model_(model),
      cross_(cross),
      mask_(mask),
      rows_(rows),
      tensors_(2 * model.manifest().decoder_layers),
      cache_(tensors_, rows, model.manifest().heads, max_length, model.manifest().head_dim),
      ids_(static_cast<size_t>(rows)),
      logits_(static_cast<size_t>(rows * model.manifest().vocab_size)) {}

int64_t OrtDecoderSession::vocab() const { return model_.manifest().vocab_size; }

bool OrtDecoderSession::screened() const { return model_.screen() != nullptr; }

void OrtDecoderSession::refine(std::vector<float>& scores, int64_t position) {
  if (screened_count_ == 1) {
    model_.screen()->refine(scores, hidden_, residual_, rows_);
    return;
  }
  const int64_t width = model_.screen()->width();
  std::vector<float> hidden(static_cast<size_t>(rows_ * width)), residual(hidden.size());
  for (int64_t row = 0; row < rows_; ++row) {
    const int64_t from = (row * screened_count_ + position) * width;
    std::copy_n(hidden_.begin() + from, width, hidden.begin() + row * width);
    std::copy_n(residual_.begin() + from, width, residual.begin() + row * width);
  }
  model_.screen()->refine(scores, hidden, residual, rows_);
}

std::vector<float> OrtDecoderSession::run(const std::vector<int64_t>& tokens, int64_t count, bool exact) {
  const Manifest& m = model_.manifest();
  const Ort::MemoryInfo& memory = model_.memory();
  ids_.assign(tokens.begin(), tokens.end());
  const int64_t positions = m.last_position_logits ? 1 : count;  // logits' positions
  logits_.resize(static_cast<size_t>(rows_ * positions * m.vocab_size));
  const std::vector<int64_t> ids_shape{rows_, count}, logits_shape{rows_, positions, m.vocab_size};
  Ort::IoBinding binding(model_.session(DECODER_STEP));
  // Bound by name (the contract checked at load, contract.hpp), never by position.
  binding.BindInput(STEP_INPUT_IDS.c_str(), Ort::Value::CreateTensor<int64_t>(memory, ids_.data(), ids_.size(),
                                                                             ids_shape.data(), ids_shape.size()));
  binding.BindInput(STEP_ENCODER_MASK.c_str(), mask_);
  for (int64_t i = 0; i < tensors_; ++i) {
    binding.BindInput(model_.past_names()[i].c_str(), cache_.view(memory, side_, i, length_));
    binding.BindOutput(model_.present_names()[i].c_str(), cache_.view(memory, 1 - side_, i, length_ + count));
  }
  for (size_t i = 0; i < cross_.size(); ++i) binding.BindInput(model_.cross_names()[i].c_str(), cross_[i]);
  if (model_.screen() != nullptr) {
    exact_logits_ = exact;
    binding.BindInput(SWITCH.c_str(), Ort::Value::CreateTensor<bool>(memory, &exact_logits_, 1, nullptr, 0));
  }
  if (!exact) {  // the bound's inputs: the last two outputs, [rows, count, width] each
    const int64_t width = model_.screen()->width();
    const std::vector<int64_t> shape{rows_, positions, width};
    screened_count_ = positions;
    hidden_.resize(static_cast<size_t>(rows_ * positions * width));
    residual_.resize(hidden_.size());
    binding.BindOutput(HIDDEN.c_str(),
                       Ort::Value::CreateTensor<float>(memory, hidden_.data(), hidden_.size(), shape.data(), 3));
    binding.BindOutput(RESIDUAL.c_str(),
                       Ort::Value::CreateTensor<float>(memory, residual_.data(), residual_.size(), shape.data(), 3));
  }
  binding.BindOutput(STEP_LOGITS.c_str(), Ort::Value::CreateTensor<float>(memory, logits_.data(), logits_.size(),
                                                                         logits_shape.data(), logits_shape.size()));
  model_.session(DECODER_STEP).Run(Ort::RunOptions{nullptr}, binding);
  side_ = 1 - side_;
  length_ += count;
  return logits_;
}

std::vector<float> OrtDecoderSession::step_all(const std::vector<int64_t>& tokens, int64_t count) {
  if (model_.manifest().last_position_logits && count > 1) {
    throw Error("internal error: this decoder step returns the last position's logits only; use step_last");
  }
  return run(tokens, count, true);
}

std::vector<float> OrtDecoderSession::step_last(const std::vector<int64_t>& tokens, int64_t count) {
  std::vector<float> logits = run(tokens, count, true);
  const int64_t positions = model_.manifest().last_position_logits ? 1 : count;
  if (positions == 1) return logits;
  const int64_t vocab = model_.manifest().vocab_size;
  std::vector<float> last(static_cast<size_t>(rows_ * vocab));
  for (int64_t row = 0; row < rows_; ++row) {
    const float* source = logits.data() + (row * positions + positions - 1) * vocab;
    std::copy(source, source + vocab, last.begin() + row * vocab);
  }
  return last;
}

void OrtDecoderSession::truncate(int64_t length) {
  if (length >= length_) return;
  cache_.truncate(side_, length_, length);
  side_ = 1 - side_;
  length_ = length;
}

void OrtDecoderSession::reorder(const std::vector<int64_t>& rows) {
  bool identity = true;
  for (size_t i = 0; i < rows.size(); ++i) identity = identity && rows[i] == static_cast<int64_t>(i);
  if (identity) return;
  cache_.gather(side_, length_, rows);
  side_ = 1 - side_;
}

}  // namespace

std::unique_ptr<Runtime> Runtime::open(const std::string& directory, const RuntimeOptions& options) {
  return std::make_unique<OrtModel>(directory, options);
}

}  // namespace cbart
