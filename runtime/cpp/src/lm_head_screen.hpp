// The C++ half of the screened LM head: exact greedy argmax from the decoder step's approximate
// (8-bit) logits. runtime/lm_head_screen.py states the error bound and why the result is exact; this
// is a line-by-line port of its LogitScreen.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace cbart {

// The decoder step's tensors of the screen, as in runtime/lm_head_screen.py: the switch input and the
// bound's two inputs, returned as outputs.
inline const std::string SWITCH = "exact_logits", HIDDEN = "hidden", RESIDUAL = "hidden_residual";

// A read-only, memory-mapped 2-D float32 .npy file (C order): pages are read only when touched.
class MappedMatrix {
 public:
  explicit MappedMatrix(const std::string& path);
  ~MappedMatrix();
  MappedMatrix(const MappedMatrix&) = delete;
  MappedMatrix& operator=(const MappedMatrix&) = delete;

  const float* row(int64_t index) const { return data_ + index * cols_; }
  const float* data() const { return data_; }
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }

 private:
  void* mapping_ = nullptr;
  size_t mapped_bytes_ = 0;
  const float* data_ = nullptr;
  int64_t rows_ = 0, cols_ = 0;
};

class LogitScreen {
 public:
  LogitScreen(const std::string& directory, const std::string& rows_file, const std::string& bounds_file);

  int64_t width() const { return weights_.cols(); }
  // The mapped rows, [vocab, width]: the sessions' shared token embedding reads the same mapping.
  const float* rows_data() const { return weights_.data(); }
  // `scores`: rows x vocab approximate logits after masking processors (-inf = masked); `hidden` and
  // `residual`: rows x width, the LM head's input and its 8-bit part. Leaves the exact logits where the
  // argmax can be and -inf elsewhere.
  void refine(std::vector<float>& scores, const std::vector<float>& hidden, const std::vector<float>& residual,
              int64_t rows) const;

 private:
  float exact(int64_t token, const float* hidden) const;

  MappedMatrix weights_;  // [vocab, width]
  MappedMatrix bounds_;   // [3, vocab]: bias, ||w - ŵ||₂, max(||w||₁, ||ŵ||₁)
  double rounding_;
  size_t max_candidates_;
};

}  // namespace cbart
