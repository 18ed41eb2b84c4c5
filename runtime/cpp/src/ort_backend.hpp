// The ONNX Runtime backend: graph sessions of an export directory and decoder sessions over them. ONNX Runtime
// is loaded at run time (dlopen + OrtGetApiBase, ORT_API_MANUAL_INIT), so one binary works with any library
// that offers the C API version of the headers it was compiled with or a newer one.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "cbart/runtime.hpp"
#include "contract.hpp"
#include "lm_head_screen.hpp"
#include "manifest.hpp"
#include "search.hpp"
#include "shared_weights.hpp"

namespace cbart {

// Loads libonnxruntime once per process (`requested`, else $CBART_ONNXRUNTIME_LIBRARY, else the build's) and
// initialises the C++ API with its OrtApi.
const OrtApi* load_onnxruntime(const std::string& requested);
std::vector<const char*> c_names(const std::vector<std::string>& names);

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
  std::vector<int64_t> ids_, positions_, self_mask_;  // the step's integer inputs (positions: --inflight exports)
  std::vector<float> logits_;
  bool exact_logits_ = true;             // the screened LM head's switch, when the export has one
  std::vector<float> hidden_, residual_;  // its bound's inputs, written by screened steps
  int64_t screened_count_ = 1;            // new positions of the last screened step
};

class OrtModel {
 public:
  // `draft`: a speculative pair's draft (no encoder graph), opened by the pair's full model.
  OrtModel(const std::string& directory, const RuntimeOptions& options, bool draft = false)
      : directory_(directory),
        manifest_(read_manifest(directory, options.check_files, draft)),
        env_((load_onnxruntime(options.onnxruntime_library), ORT_LOGGING_LEVEL_WARNING), "cbart"),
        memory_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)) {
    const auto& step_inputs = manifest_.inputs.at(DECODER_STEP);
    if (!manifest_.lm_head_rows.empty() &&
        std::find(step_inputs.begin(), step_inputs.end(), SWITCH) != step_inputs.end()) {
      screen_ = std::make_unique<LogitScreen>(directory, manifest_.lm_head_rows, manifest_.lm_head_bounds);
    }
    shared_ = std::make_unique<SharedWeights>(directory, manifest_.shared_weights, screen_.get(), manifest_.lm_head_rows);
    for (const auto& [name, file] : manifest_.graph_files) {
      Ort::SessionOptions session_options;
      shared_->options_for(name, session_options);
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
    if (!manifest_.draft_directory.empty()) {
      draft_ = std::make_unique<OrtModel>(directory + "/" + manifest_.draft_directory, options, true);
    }
  }

  // The encoder graph: input ids and mask (rows x width) -> the encoder states.
  Ort::Value encode(std::vector<int64_t>& ids, std::vector<int64_t>& mask, int64_t rows, int64_t width);
  Ort::Value tensor(std::vector<int64_t>& values, int64_t rows, int64_t width);
  OrtModel* draft() { return draft_.get(); }
  const std::string& directory() const { return directory_; }

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
  std::string directory_;
  Manifest manifest_;
  Ort::Env env_;
  Ort::MemoryInfo memory_;
  std::unique_ptr<LogitScreen> screen_;    // before the sessions: they read its mapping (shared_)
  std::unique_ptr<SharedWeights> shared_;  // and are destroyed first
  std::map<std::string, Ort::Session> sessions_;
  std::unique_ptr<OrtModel> draft_;
  std::vector<std::string> past_names_ = cache_names(PAST, manifest_.decoder_layers),
                           present_names_ = cache_names(PRESENT, manifest_.decoder_layers),
                           cross_names_ = cache_names(CROSS, manifest_.decoder_layers);
};

}  // namespace cbart
