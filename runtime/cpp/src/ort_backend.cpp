#include "ort_backend.hpp"

#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>

#ifndef CBART_DEFAULT_ONNXRUNTIME_LIBRARY
#define CBART_DEFAULT_ONNXRUNTIME_LIBRARY "libonnxruntime.so"
#endif

namespace cbart {

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

Ort::Value OrtModel::tensor(std::vector<int64_t>& values, int64_t rows, int64_t width) {
  const std::vector<int64_t> shape{rows, width};
  return Ort::Value::CreateTensor<int64_t>(memory_, values.data(), values.size(), shape.data(), 2);
}

Ort::Value OrtModel::encode(std::vector<int64_t>& ids, std::vector<int64_t>& mask, int64_t rows, int64_t width) {
  Ort::Value ids_value = tensor(ids, rows, width), mask_value = tensor(mask, rows, width);
  return std::move(run(ENCODER, {"input_ids", "attention_mask"}, {&ids_value, &mask_value})[0]);
}

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
  if (m.per_row_positions) {  // an --inflight export: here every row has the same length (backends/base.py)
    positions_.resize(static_cast<size_t>(rows_ * count));
    for (int64_t row = 0; row < rows_; ++row) {
      for (int64_t i = 0; i < count; ++i) positions_[row * count + i] = length_ + i;
    }
    self_mask_.assign(static_cast<size_t>(rows_ * (length_ + count)), 1);
    const std::vector<int64_t> mask_shape{rows_, length_ + count};
    binding.BindInput(STEP_POSITIONS.c_str(), Ort::Value::CreateTensor<int64_t>(memory, positions_.data(), positions_.size(),
                                                                               ids_shape.data(), ids_shape.size()));
    binding.BindInput(STEP_SELF_MASK.c_str(), Ort::Value::CreateTensor<int64_t>(memory, self_mask_.data(), self_mask_.size(),
                                                                               mask_shape.data(), mask_shape.size()));
  }
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

}  // namespace cbart
