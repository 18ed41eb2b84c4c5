// The ONNX Runtime backend and the Runtime facade. ONNX Runtime is loaded at run time (dlopen +
// OrtGetApiBase, ORT_API_MANUAL_INIT), so one binary works with any library that offers the C API
// version of the headers it was compiled with or a newer one.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <dlfcn.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "cbart/runtime.hpp"
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

class OrtDecoderSession final : public DecoderSession {
 public:
  OrtDecoderSession(OrtModel& model, std::vector<Ort::Value>& cross, Ort::Value& mask, int64_t rows);
  std::vector<float> step(const std::vector<int64_t>& tokens) override;
  void reorder(const std::vector<int64_t>& rows) override;
  int64_t vocab() const override;

 private:
  OrtModel& model_;
  std::vector<Ort::Value>& cross_;
  Ort::Value& mask_;
  std::vector<Ort::Value> past_;
  int64_t rows_;
};

class OrtModel final : public Runtime {
 public:
  OrtModel(const std::string& directory, const RuntimeOptions& options)
      : manifest_(read_manifest(directory, options.check_files)),
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
  }

  int64_t vocab_size() const override { return manifest_.vocab_size; }

  GenerationResult generate(const std::vector<Sequence>& inputs, const GenerationOptions& options) override {
    const SearchSettings settings = resolve(options);
    std::vector<int64_t> ids, mask;
    const int64_t sources = static_cast<int64_t>(inputs.size());
    const int64_t width = pad(inputs, ids, mask);
    const auto started = Clock::now();
    std::vector<int64_t> shape{sources, width};
    Ort::Value ids_value = Ort::Value::CreateTensor<int64_t>(memory_, ids.data(), ids.size(), shape.data(), 2);
    Ort::Value mask_value = Ort::Value::CreateTensor<int64_t>(memory_, mask.data(), mask.size(), shape.data(), 2);
    std::vector<Ort::Value> states = run("encoder", {"input_ids", "attention_mask"}, {&ids_value, &mask_value});
    if (sessions_.count("autoencoder")) states = run("autoencoder", {"hidden_states"}, {&states[0]});
    std::vector<Ort::Value> cross = run("cross_kv", {"memory"}, {&states[0]});
    const auto encoded = Clock::now();
    const int64_t rows_per_source = settings.num_beams > 1 ? settings.num_beams : 1;
    OrtDecoderSession session(*this, cross, mask_value, sources * rows_per_source);
    Rows output = settings.num_beams > 1 ? beam_search(session, sources, settings)
                                         : greedy_search(session, sources, settings);
    GenerationResult result;
    result.sequences = std::move(output);
    result.encode_ms = milliseconds(started, encoded);
    result.decode_ms = milliseconds(encoded, Clock::now());
    return result;
  }

  std::vector<Ort::Value> run(const std::string& graph, const std::vector<std::string>& names,
                              const std::vector<Ort::Value*>& values) {
    std::vector<const char*> input_names = c_names(names);
    const auto& outputs = manifest_.outputs.at(graph);
    std::vector<const char*> output_names = c_names(outputs);
    std::vector<Ort::Value> inputs;
    inputs.reserve(values.size());
    for (Ort::Value* value : values) inputs.emplace_back(Ort::Value{value->operator OrtValue*()});
    auto results = sessions_.at(graph).Run(Ort::RunOptions{nullptr}, input_names.data(), inputs.data(),
                                           inputs.size(), output_names.data(), output_names.size());
    for (auto& borrowed : inputs) borrowed.release();  // the caller still owns these values
    return results;
  }

  const Manifest& manifest() const { return manifest_; }
  const Ort::MemoryInfo& memory() const { return memory_; }

 private:
  SearchSettings resolve(const GenerationOptions& o) const {
    SearchSettings s;
    s.eos = manifest_.eos;
    s.pad = manifest_.pad;
    s.decoder_start = manifest_.decoder_start;
    s.forced_bos = manifest_.forced_bos;
    s.forced_eos = manifest_.forced_eos;
    s.max_length = o.max_new_tokens ? *o.max_new_tokens + 1 : o.max_length.value_or(manifest_.max_length);
    s.min_length = o.min_length.value_or(o.min_new_tokens ? 0 : manifest_.min_length);
    s.min_new_tokens = o.min_new_tokens.value_or(0);
    s.num_beams = o.num_beams.value_or(manifest_.num_beams);
    s.no_repeat_ngram_size = o.no_repeat_ngram_size.value_or(manifest_.no_repeat_ngram_size);
    s.num_return_sequences = o.num_return_sequences.value_or(1);
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

  int64_t pad(const std::vector<Sequence>& inputs, std::vector<int64_t>& ids, std::vector<int64_t>& mask) const {
    if (inputs.empty()) throw Error("empty input: pass at least one sequence of token ids");
    size_t width = 0;
    for (const auto& sequence : inputs) {
      if (sequence.empty()) throw Error("empty input: one of the inputs has no tokens");
      if (sequence.size() > static_cast<size_t>(manifest_.max_source_positions)) {
        throw Error("input of " + std::to_string(sequence.size()) + " tokens exceeds the model's maximum of " +
                    std::to_string(manifest_.max_source_positions) + "; truncate it");
      }
      for (int64_t token : sequence) {
        if (token < 0 || token >= manifest_.vocab_size) {
          throw Error("token id " + std::to_string(token) + " is outside the vocabulary (0.." +
                      std::to_string(manifest_.vocab_size - 1) + ")");
        }
      }
      width = std::max(width, sequence.size());
    }
    ids.assign(inputs.size() * width, manifest_.pad);
    mask.assign(inputs.size() * width, 0);
    for (size_t row = 0; row < inputs.size(); ++row) {
      std::copy(inputs[row].begin(), inputs[row].end(), ids.begin() + row * width);
      std::fill(mask.begin() + row * width, mask.begin() + row * width + inputs[row].size(), 1);
    }
    return static_cast<int64_t>(width);
  }

  Manifest manifest_;
  Ort::Env env_;
  Ort::MemoryInfo memory_;
  std::map<std::string, Ort::Session> sessions_;
};

OrtDecoderSession::OrtDecoderSession(OrtModel& model, std::vector<Ort::Value>& cross, Ort::Value& mask, int64_t rows)
    : model_(model), cross_(cross), mask_(mask), rows_(rows) {
  const Manifest& m = model.manifest();
  std::vector<int64_t> shape{rows, m.heads, 0, m.head_dim};
  Ort::AllocatorWithDefaultOptions allocator;
  for (int i = 0; i < 2 * m.decoder_layers; ++i) {
    past_.push_back(Ort::Value::CreateTensor<float>(allocator, shape.data(), shape.size()));
  }
}

int64_t OrtDecoderSession::vocab() const { return model_.manifest().vocab_size; }

std::vector<float> OrtDecoderSession::step(const std::vector<int64_t>& tokens) {
  std::vector<int64_t> ids = tokens;
  std::vector<int64_t> shape{static_cast<int64_t>(ids.size()), 1};
  Ort::Value ids_value = Ort::Value::CreateTensor<int64_t>(model_.memory(), ids.data(), ids.size(), shape.data(), 2);
  std::vector<std::string> names = model_.manifest().inputs.at("decoder_step");
  std::vector<Ort::Value*> values{&ids_value, &mask_};
  for (auto& value : past_) values.push_back(&value);
  for (auto& value : cross_) values.push_back(&value);
  std::vector<Ort::Value> outputs = model_.run("decoder_step", names, values);
  const auto info = outputs[0].GetTensorTypeAndShapeInfo();
  const std::vector<int64_t> logits_shape = info.GetShape();  // rows, steps, vocab
  const int64_t vocab = logits_shape[2], steps = logits_shape[1];
  const float* data = outputs[0].GetTensorData<float>();
  std::vector<float> last(static_cast<size_t>(rows_ * vocab));
  for (int64_t row = 0; row < rows_; ++row) {
    std::memcpy(last.data() + row * vocab, data + (row * steps + steps - 1) * vocab, sizeof(float) * vocab);
  }
  past_.clear();
  for (size_t i = 1; i < outputs.size(); ++i) past_.push_back(std::move(outputs[i]));
  return last;
}

void OrtDecoderSession::reorder(const std::vector<int64_t>& rows) {
  bool identity = true;
  for (size_t i = 0; i < rows.size(); ++i) identity = identity && rows[i] == static_cast<int64_t>(i);
  if (identity) return;
  Ort::AllocatorWithDefaultOptions allocator;
  for (auto& value : past_) {
    std::vector<int64_t> shape = value.GetTensorTypeAndShapeInfo().GetShape();
    const int64_t row_size = shape[1] * shape[2] * shape[3];
    Ort::Value copy = Ort::Value::CreateTensor<float>(allocator, shape.data(), shape.size());
    const float* source = value.GetTensorData<float>();
    float* target = copy.GetTensorMutableData<float>();
    for (size_t i = 0; i < rows.size(); ++i) {
      std::memcpy(target + i * row_size, source + rows[i] * row_size, sizeof(float) * row_size);
    }
    value = std::move(copy);
  }
}

}  // namespace

std::unique_ptr<Runtime> Runtime::open(const std::string& directory, const RuntimeOptions& options) {
  return std::make_unique<OrtModel>(directory, options);
}

}  // namespace cbart
