// Greedy and beam search over any decoder session, with transformers' semantics (a port of
// runtime/search.py: same processor order, length penalty, early-stopping heuristic, padding after EOS).
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "cbart/runtime.hpp"
#include "processors.hpp"

namespace cbart {

// Decoder state of one request. Rows are grouped by source: rows [n*K, (n+1)*K) decode source n.
class DecoderSession {
 public:
  virtual ~DecoderSession() = default;
  // Feeds one token per row; returns next-token logits, rows x vocab, row-major.
  virtual std::vector<float> step(const std::vector<int64_t>& tokens) = 0;
  // Keeps the self-attention cache of `rows`, in that order (beam search).
  virtual void reorder(const std::vector<int64_t>& rows) = 0;
  virtual int64_t vocab() const = 0;
  // Screened greedy search (exports with a screened LM head, see lm_head_screen.hpp): `step_screened`
  // returns approximate logits; after the masking processors, `refine` makes them argmax-exact.
  // `step_all_screened` does the same at every new position (rows x count x vocab); `refine` then takes
  // the position its scores come from.
  virtual bool screened() const { return false; }
  virtual std::vector<float> step_screened(const std::vector<int64_t>& tokens) { return step(tokens); }
  virtual std::vector<float> step_all_screened(const std::vector<int64_t>& tokens, int64_t count) {
    return step_all(tokens, count);
  }
  virtual void refine(std::vector<float>& /*scores*/, int64_t /*position*/ = 0) {}
  // Speculative decoding (speculative.cpp): feeds `count` tokens per row (rows x count, row-major) and
  // returns the logits at every new position (rows x count x vocab); `truncate` keeps the first `length`
  // positions of the self-attention cache (rejected proposals are dropped). `step_last` feeds the same
  // and returns the last position's logits only (rows x vocab): what the draft proposes from.
  virtual std::vector<float> step_all(const std::vector<int64_t>& /*tokens*/, int64_t /*count*/) {
    throw Error("this decoder session cannot verify several tokens per step");
  }
  virtual std::vector<float> step_last(const std::vector<int64_t>& /*tokens*/, int64_t /*count*/) {
    throw Error("this decoder session cannot take several tokens per step");
  }
  virtual void truncate(int64_t /*length*/) { throw Error("this decoder session cannot drop cache positions"); }
};

// transformers' early_stopping for beam search: false (heuristic), true (stop when num_beams hypotheses are
// done), "never" (the canonical beam search).
enum class EarlyStopping { kFalse, kTrue, kNever };

struct SearchSettings {
  int max_length = 20;
  int64_t eos = 2, pad = 1, decoder_start = 2;
  int min_length = 0, min_new_tokens = 0, num_beams = 1, no_repeat_ngram_size = 0, num_return_sequences = 1;
  float length_penalty = 1.0f, repetition_penalty = 1.0f;
  EarlyStopping early_stopping = EarlyStopping::kFalse;
  std::optional<int64_t> forced_bos, forced_eos;
};

using Rows = std::vector<std::vector<int64_t>>;

// Applies the logits processors (processors.hpp) in place; `sequences` are the tokens so far, one row per
// score row.
void process_scores(std::vector<float>& scores, int64_t vocab, const Rows& sequences,
                    const LogitsProcessors& processors);
void process_scores(std::vector<float>& scores, int64_t vocab, const Rows& sequences, const SearchSettings& settings);
Rows greedy_search(DecoderSession& session, int64_t rows, const SearchSettings& settings);
Rows beam_search(DecoderSession& session, int64_t sources, const SearchSettings& settings);

// How many tokens the draft proposes per verification (runtime/speculative.py's DraftLength, rule for rule):
// all accepted -> one more (up to `maximum`); none accepted -> one fewer; at zero, plain full-decoder steps
// and a one-token probe after `probe_interval` of them, the interval doubling after each failed probe.
class DraftLength {
 public:
  explicit DraftLength(int start = 2, int maximum = 8, bool adaptive = true, int probe_interval = 4,
                       int max_probe_interval = 64);
  int propose();
  void update(int proposed, int accepted);
  int current() const { return current_; }

 private:
  int start_, maximum_;
  bool adaptive_;
  int probe_interval_, max_probe_interval_;
  int current_, wait_ = 0, interval_;
};

// The full model's greedy ids, `full` verifying what `draft` proposes (runtime/speculative.py's speculative_greedy).
Rows speculative_greedy(DecoderSession& full, DecoderSession& draft, int64_t rows, const SearchSettings& settings,
                        DraftLength& draft_length, SpeculationStats& stats);

}  // namespace cbart
