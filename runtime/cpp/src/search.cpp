#include "search.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace cbart {
namespace {

constexpr float kBigNegative = -1.0e9f;

void log_softmax(std::vector<float>& logits, int64_t vocab) {
  for (size_t row = 0; row * vocab < logits.size(); ++row) {
    float* values = logits.data() + row * vocab;
    const float maximum = *std::max_element(values, values + vocab);
    // float exp (as runtime/search.py's float32 NumPy path), summed in double: a beam step runs this over
    // beams x vocab values, where double-precision exp costs milliseconds.
    double total = 0.0;
    for (int64_t i = 0; i < vocab; ++i) total += std::exp(values[i] - maximum);
    const float log_total = static_cast<float>(std::log(total));
    for (int64_t i = 0; i < vocab; ++i) values[i] = (values[i] - maximum) - log_total;
  }
}

// Indices of the k largest values, descending; ties keep the lower index first. One pass with a k-entry
// heap whose top is the worst entry kept: linear in count (k is 2 x beams), no index array over it.
std::vector<int64_t> top_k(const float* values, int64_t count, int64_t k) {
  const auto better = [values](int64_t a, int64_t b) { return values[a] > values[b] || (values[a] == values[b] && a < b); };
  std::vector<int64_t> kept;
  kept.reserve(static_cast<size_t>(k));
  for (int64_t i = 0; i < count; ++i) {
    if (static_cast<int64_t>(kept.size()) < k) {
      kept.push_back(i);
      std::push_heap(kept.begin(), kept.end(), better);
    } else if (better(i, kept.front())) {
      std::pop_heap(kept.begin(), kept.end(), better);
      kept.back() = i;
      std::push_heap(kept.begin(), kept.end(), better);
    }
  }
  std::sort(kept.begin(), kept.end(), better);
  return kept;
}

}  // namespace

void process_scores(std::vector<float>& scores, int64_t vocab, const Rows& sequences,
                    const LogitsProcessors& processors) {
  for (size_t row = 0; row < sequences.size(); ++row) {
    for (const auto& processor : processors) processor->apply(scores.data() + row * vocab, vocab, sequences[row]);
  }
}

void process_scores(std::vector<float>& scores, int64_t vocab, const Rows& sequences, const SearchSettings& s) {
  process_scores(scores, vocab, sequences, logits_processors(s));
}

Rows greedy_search(DecoderSession& session, int64_t rows, const SearchSettings& s) {
  const int64_t vocab = session.vocab();
  Rows sequences(static_cast<size_t>(rows), std::vector<int64_t>{s.decoder_start});
  std::vector<bool> unfinished(static_cast<size_t>(rows), true);
  std::vector<int64_t> last(static_cast<size_t>(rows), s.decoder_start);
  const LogitsProcessors processors = logits_processors(s);
  // The screen needs every processor to mask or force tokens only.
  const bool screened = session.screened() && masks_only(processors);
  while (true) {
    std::vector<float> scores = screened ? session.step_screened(last) : session.step(last);
    process_scores(scores, vocab, sequences, processors);
    if (screened) session.refine(scores);
    bool any = false;
    for (int64_t row = 0; row < rows; ++row) {
      const float* values = scores.data() + row * vocab;
      int64_t token = std::max_element(values, values + vocab) - values;
      if (!unfinished[row]) token = s.pad;
      sequences[row].push_back(token);
      last[row] = token;
      if (token == s.eos) unfinished[row] = false;
      any = any || unfinished[row];
    }
    if (!any || static_cast<int>(sequences[0].size()) >= s.max_length) return sequences;
  }
}

namespace {

// One hypothesis: its tokens (max_length entries, `fill` past the end), the flattened beam index each
// generated step came from (-1: none), its score and whether it ended.
struct Hypothesis {
  std::vector<int64_t> tokens;
  std::vector<int64_t> indices;
  float score = 0.0f;
  bool finished = false;
};

// transformers' beam search state (runtime/search.py's BeamState): per source, num_beams running and
// num_beams finished hypotheses.
struct BeamState {
  std::vector<std::vector<Hypothesis>> running, finished;
  std::vector<bool> improvable;  // the early-stop heuristic has not closed the source
  int cur_len = 1;

  static BeamState start(int64_t sources, const SearchSettings& s) {
    const int64_t fill = s.pad ? s.pad : s.eos;
    Hypothesis blank{std::vector<int64_t>(static_cast<size_t>(s.max_length), fill),
                     std::vector<int64_t>(static_cast<size_t>(s.max_length - 1), -1), kBigNegative, false};
    blank.tokens[0] = s.decoder_start;
    BeamState state{std::vector<std::vector<Hypothesis>>(sources, std::vector<Hypothesis>(s.num_beams, blank)),
                    std::vector<std::vector<Hypothesis>>(sources, std::vector<Hypothesis>(s.num_beams, blank)),
                    std::vector<bool>(static_cast<size_t>(sources), true)};
    // All beams start identical: only the first may continue.
    for (auto& group : state.running) group[0].score = 0.0f;
    return state;
  }
};

// The 2 x num_beams best one-token continuations of each source's running beams (score: summed log-probs).
struct Continuations {
  std::vector<std::vector<Hypothesis>> top;
  std::vector<std::vector<bool>> hits;  // ends here (EOS or max_length)
};

// The named steps of one iteration, as runtime/search.py's BEAM_STEPS, called in the same order by
// beam_search (tests/test_search_steps.py compares the two).

// Steps the decoder on each running beam's last token; processed log-probs plus the beam's score
// (rows x vocab, rows grouped by source).
std::vector<float> beam_log_probs(DecoderSession& session, const BeamState& state, const LogitsProcessors& processors) {
  const int64_t vocab = session.vocab();
  Rows flat;
  std::vector<int64_t> last;
  for (const auto& group : state.running) {
    for (const auto& hypothesis : group) {
      flat.emplace_back(hypothesis.tokens.begin(), hypothesis.tokens.begin() + state.cur_len);
      last.push_back(hypothesis.tokens[state.cur_len - 1]);
    }
  }
  std::vector<float> scores = session.step(last);
  log_softmax(scores, vocab);
  process_scores(scores, vocab, flat, processors);
  size_t row = 0;
  for (const auto& group : state.running) {
    for (const auto& hypothesis : group) {
      for (int64_t v = 0; v < vocab; ++v) scores[row * vocab + v] += hypothesis.score;
      ++row;
    }
  }
  return scores;
}

// Keeps 2 x num_beams candidates per source, so that num_beams remain after the ones that end.
Continuations top_k_continuations(const BeamState& state, const std::vector<float>& log_probs, int64_t vocab,
                                  const SearchSettings& s) {
  const int64_t beams = s.num_beams, keep = 2 * beams, width = beams * vocab;
  Continuations continuations;
  for (size_t n = 0; n < state.running.size(); ++n) {
    const float* candidates = log_probs.data() + n * width;
    std::vector<Hypothesis> top;
    std::vector<bool> hits;
    for (int64_t flat : top_k(candidates, width, keep)) {
      const int64_t beam = flat / vocab, token = flat % vocab;
      Hypothesis hypothesis = state.running[n][beam];
      hypothesis.tokens[state.cur_len] = token;
      hypothesis.indices[state.cur_len - 1] = beam + static_cast<int64_t>(n) * beams;
      hypothesis.score = candidates[flat];
      top.push_back(std::move(hypothesis));
      hits.push_back(token == s.eos || state.cur_len + 1 >= s.max_length);
    }
    continuations.top.push_back(std::move(top));
    continuations.hits.push_back(std::move(hits));
  }
  return continuations;
}

// The best num_beams continuations that did not end keep running.
void update_running_beams(BeamState& state, const Continuations& continuations, int64_t beams) {
  for (size_t n = 0; n < state.running.size(); ++n) {
    std::vector<float> masked;
    for (size_t i = 0; i < continuations.top[n].size(); ++i) {
      masked.push_back(continuations.top[n][i].score + (continuations.hits[n][i] ? kBigNegative : 0.0f));
    }
    const std::vector<int64_t> chosen = top_k(masked.data(), static_cast<int64_t>(masked.size()), beams);
    for (int64_t b = 0; b < beams; ++b) {
      state.running[n][b] = continuations.top[n][chosen[b]];
      state.running[n][b].score = masked[chosen[b]];
    }
  }
}

// Continuations that ended among the top num_beams compete, length-penalised, with the finished ones; a
// source refuses new candidates once early_stopping=true has filled it or the heuristic has closed it.
void update_finished_beams(BeamState& state, const Continuations& continuations, const SearchSettings& s) {
  const int64_t beams = s.num_beams;
  const int new_tokens = state.cur_len;  // the candidate's generated length: cur_len + 1 tokens less the start
  const float penalty = static_cast<float>(std::pow(static_cast<double>(new_tokens), s.length_penalty));
  for (size_t n = 0; n < state.finished.size(); ++n) {
    bool full = true;
    for (const auto& hypothesis : state.finished[n]) full = full && hypothesis.finished;
    std::vector<Hypothesis> merged = state.finished[n];
    for (size_t i = 0; i < continuations.top[n].size(); ++i) {
      const bool just_finished = continuations.hits[n][i] && static_cast<int64_t>(i) < beams;
      Hypothesis hypothesis = continuations.top[n][i];
      hypothesis.score /= penalty;
      if (full && s.early_stopping == EarlyStopping::kTrue) hypothesis.score += kBigNegative;
      if (!state.improvable[n]) hypothesis.score += kBigNegative;
      if (!just_finished) hypothesis.score += kBigNegative;
      hypothesis.finished = just_finished;
      merged.push_back(std::move(hypothesis));
    }
    std::vector<float> merged_scores;
    for (const auto& hypothesis : merged) merged_scores.push_back(hypothesis.score);
    std::vector<Hypothesis> kept;
    for (int64_t index : top_k(merged_scores.data(), static_cast<int64_t>(merged.size()), beams)) {
      kept.push_back(merged[index]);
    }
    state.finished[n] = std::move(kept);
  }
}

// Closes a source once its best running beam, length-penalised, cannot beat its worst finished one
// (credited with the longest reachable length under early_stopping="never" and a positive length penalty).
void check_early_stop_heuristic(BeamState& state, const SearchSettings& s) {
  const bool never = s.early_stopping == EarlyStopping::kNever;
  const int best_length = (never && s.length_penalty > 0.0f) ? s.max_length - 1 : state.cur_len - 1;
  const float divisor = static_cast<float>(std::pow(static_cast<double>(best_length), s.length_penalty));
  for (size_t n = 0; n < state.finished.size(); ++n) {
    float minimum = std::numeric_limits<float>::infinity();
    for (const auto& hypothesis : state.finished[n]) minimum = std::min(minimum, hypothesis.score);
    bool better = false;
    for (const auto& hypothesis : state.finished[n]) {
      const float worst = hypothesis.finished ? minimum : kBigNegative;
      better = better || state.running[n][0].score / divisor > worst;
    }
    state.improvable[n] = state.improvable[n] && better;
  }
}

// Goes on while some source can improve, early_stopping=true has not filled every source, and not every
// continuation ended.
bool has_unfinished_sequences(const BeamState& state, const Continuations& continuations, const SearchSettings& s) {
  bool any_improvable = false, filled = true, all_hit = true;
  for (size_t n = 0; n < state.finished.size(); ++n) {
    any_improvable = any_improvable || state.improvable[n];
    for (const auto& hypothesis : state.finished[n]) filled = filled && hypothesis.finished;
    for (bool hit : continuations.hits[n]) all_hit = all_hit && hit;
  }
  filled = filled && s.early_stopping == EarlyStopping::kTrue;
  return any_improvable && !filled && !all_hit;
}

// The best num_return_sequences finished hypotheses per source, trimmed to the longest one.
Rows finalize_beams(const BeamState& state, const SearchSettings& s) {
  size_t generated = 0;
  for (const auto& group : state.finished) {
    for (int64_t r = 0; r < s.num_return_sequences; ++r) {
      const auto& indices = group[r].indices;
      generated = std::max<size_t>(generated, std::count_if(indices.begin(), indices.end(), [](int64_t i) { return i != -1; }));
    }
  }
  Rows out;
  for (const auto& group : state.finished) {
    for (int64_t r = 0; r < s.num_return_sequences; ++r) {
      out.emplace_back(group[r].tokens.begin(), group[r].tokens.begin() + 1 + generated);
    }
  }
  return out;
}

}  // namespace

// transformers' beam search, step for step: the named steps above in order, the cache reordered to the
// surviving beams between them.
Rows beam_search(DecoderSession& session, int64_t sources, const SearchSettings& s) {
  const LogitsProcessors processors = logits_processors(s);
  BeamState state = BeamState::start(sources, s);
  while (true) {
    const std::vector<float> log_probs = beam_log_probs(session, state, processors);
    const Continuations continuations = top_k_continuations(state, log_probs, session.vocab(), s);
    update_running_beams(state, continuations, s.num_beams);
    update_finished_beams(state, continuations, s);
    std::vector<int64_t> rows;
    for (const auto& group : state.running) {
      for (const auto& hypothesis : group) rows.push_back(hypothesis.indices[state.cur_len - 1]);
    }
    session.reorder(rows);
    ++state.cur_len;
    check_early_stop_heuristic(state, s);
    if (!has_unfinished_sequences(state, continuations, s)) return finalize_beams(state, s);
  }
}

}  // namespace cbart
