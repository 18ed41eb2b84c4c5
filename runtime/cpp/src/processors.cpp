#include "processors.hpp"

#include <algorithm>
#include <limits>
#include <set>

#include "search.hpp"

namespace cbart {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

class RepetitionPenalty final : public LogitsProcessor {
 public:
  explicit RepetitionPenalty(float penalty) : penalty_(penalty) {}
  std::string name() const override { return "repetition_penalty"; }
  bool masks_only() const override { return false; }
  void apply(float* scores, int64_t /*vocab*/, const std::vector<int64_t>& tokens) const override {
    for (int64_t token : std::set<int64_t>(tokens.begin(), tokens.end())) {
      float& v = scores[token];
      v = v < 0 ? v * penalty_ : v / penalty_;
    }
  }

 private:
  float penalty_;
};

class NoRepeatNGram final : public LogitsProcessor {
 public:
  explicit NoRepeatNGram(int size) : size_(size) {}
  std::string name() const override { return "no_repeat_ngram"; }
  bool masks_only() const override { return true; }
  void apply(float* scores, int64_t /*vocab*/, const std::vector<int64_t>& tokens) const override {
    const int n = size_, cur_len = static_cast<int>(tokens.size());
    if (cur_len + 1 < n) return;
    for (int start = 0; start + n - 1 < cur_len; ++start) {
      if (std::equal(tokens.begin() + start, tokens.begin() + start + n - 1, tokens.end() - (n - 1))) {
        scores[tokens[start + n - 1]] = kNegInf;
      }
    }
  }

 private:
  int size_;
};

class MinLength final : public LogitsProcessor {
 public:
  MinLength(int min_length, int64_t eos) : min_length_(min_length), eos_(eos) {}
  std::string name() const override { return "min_length"; }
  bool masks_only() const override { return true; }
  void apply(float* scores, int64_t /*vocab*/, const std::vector<int64_t>& tokens) const override {
    if (static_cast<int>(tokens.size()) < min_length_) scores[eos_] = kNegInf;
  }

 private:
  int min_length_;
  int64_t eos_;
};

class MinNewTokens final : public LogitsProcessor {
 public:
  MinNewTokens(int min_new_tokens, int64_t eos) : min_new_tokens_(min_new_tokens), eos_(eos) {}
  std::string name() const override { return "min_new_tokens"; }
  bool masks_only() const override { return true; }
  void apply(float* scores, int64_t /*vocab*/, const std::vector<int64_t>& tokens) const override {
    if (static_cast<int>(tokens.size()) - 1 < min_new_tokens_) scores[eos_] = kNegInf;
  }

 private:
  int min_new_tokens_;
  int64_t eos_;
};

class ForcedBOS final : public LogitsProcessor {
 public:
  explicit ForcedBOS(int64_t token) : token_(token) {}
  std::string name() const override { return "forced_bos"; }
  bool masks_only() const override { return true; }
  void apply(float* scores, int64_t vocab, const std::vector<int64_t>& tokens) const override {
    if (tokens.size() != 1) return;
    std::fill(scores, scores + vocab, kNegInf);
    scores[token_] = 0.0f;
  }

 private:
  int64_t token_;
};

class ForcedEOS final : public LogitsProcessor {
 public:
  ForcedEOS(int64_t token, int max_length) : token_(token), max_length_(max_length) {}
  std::string name() const override { return "forced_eos"; }
  bool masks_only() const override { return true; }
  void apply(float* scores, int64_t vocab, const std::vector<int64_t>& tokens) const override {
    if (static_cast<int>(tokens.size()) != max_length_ - 1) return;
    std::fill(scores, scores + vocab, kNegInf);
    scores[token_] = 0.0f;
  }

 private:
  int64_t token_;
  int max_length_;
};

}  // namespace

LogitsProcessors logits_processors(const SearchSettings& s) {
  LogitsProcessors processors;
  if (s.repetition_penalty != 1.0f) processors.push_back(std::make_unique<RepetitionPenalty>(s.repetition_penalty));
  if (s.no_repeat_ngram_size > 0) processors.push_back(std::make_unique<NoRepeatNGram>(s.no_repeat_ngram_size));
  if (s.min_length > 0) processors.push_back(std::make_unique<MinLength>(s.min_length, s.eos));
  if (s.min_new_tokens > 0) processors.push_back(std::make_unique<MinNewTokens>(s.min_new_tokens, s.eos));
  if (s.forced_bos) processors.push_back(std::make_unique<ForcedBOS>(*s.forced_bos));
  if (s.forced_eos) processors.push_back(std::make_unique<ForcedEOS>(*s.forced_eos, s.max_length));
  return processors;
}

bool masks_only(const LogitsProcessors& processors) {
  return std::all_of(processors.begin(), processors.end(), [](const auto& p) { return p->masks_only(); });
}

std::vector<std::string> names(const LogitsProcessors& processors) {
  std::vector<std::string> out;
  for (const auto& processor : processors) out.push_back(processor->name());
  return out;
}

}  // namespace cbart
