// Greedy and beam search over any decoder session, with transformers' semantics (a port of
// runtime/search.py: same processor order, length penalty, early-stopping heuristic, padding after EOS).
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

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
  virtual bool screened() const { return false; }
  virtual std::vector<float> step_screened(const std::vector<int64_t>& tokens) { return step(tokens); }
  virtual void refine(std::vector<float>& /*scores*/) {}
};

struct SearchSettings {
  int max_length = 20;
  int64_t eos = 2, pad = 1, decoder_start = 2;
  int min_length = 0, min_new_tokens = 0, num_beams = 1, no_repeat_ngram_size = 0, num_return_sequences = 1;
  float length_penalty = 1.0f, repetition_penalty = 1.0f;
  int early_stopping = 0;  // 0 = false, 1 = true, 2 = "never"
  std::optional<int64_t> forced_bos, forced_eos;
};

using Rows = std::vector<std::vector<int64_t>>;

// Applies the logits processors in place; `sequences` are the tokens so far, one row per score row.
void process_scores(std::vector<float>& scores, int64_t vocab, const Rows& sequences, const SearchSettings& settings);
Rows greedy_search(DecoderSession& session, int64_t rows, const SearchSettings& settings);
Rows beam_search(DecoderSession& session, int64_t sources, const SearchSettings& settings);

}  // namespace cbart
