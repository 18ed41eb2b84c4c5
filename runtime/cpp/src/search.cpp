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

Rows beam_search(DecoderSession& session, int64_t sources, const SearchSettings& s) {
  const int64_t beams = s.num_beams, keep = 2 * beams, vocab = session.vocab();
  const LogitsProcessors processors = logits_processors(s);
  const int prompt = 1;
  const int64_t fill = s.pad ? s.pad : s.eos;
  struct Hypothesis {
    std::vector<int64_t> tokens;   // max_length entries, `fill` past the end
    std::vector<int64_t> indices;  // flattened beam index per generated step, -1 = none
    float score = 0.0f;
    bool finished = false;
  };
  const Hypothesis blank{std::vector<int64_t>(static_cast<size_t>(s.max_length), fill),
                         std::vector<int64_t>(static_cast<size_t>(s.max_length - prompt), -1), 0.0f, false};
  std::vector<std::vector<Hypothesis>> running(sources, std::vector<Hypothesis>(beams, blank));
  std::vector<std::vector<Hypothesis>> done(sources, std::vector<Hypothesis>(beams, blank));
  for (auto& group : running) {
    for (int64_t b = 0; b < beams; ++b) {
      group[b].tokens[0] = s.decoder_start;
      group[b].score = b == 0 ? 0.0f : kBigNegative;
    }
  }
  for (auto& group : done) {
    for (auto& hypothesis : group) {
      hypothesis.tokens[0] = s.decoder_start;
      hypothesis.score = kBigNegative;
    }
  }
  std::vector<bool> improvable(sources, true);
  int cur_len = prompt;
  while (true) {
    Rows flat;
    std::vector<int64_t> last;
    for (const auto& group : running) {
      for (const auto& hypothesis : group) {
        flat.emplace_back(hypothesis.tokens.begin(), hypothesis.tokens.begin() + cur_len);
        last.push_back(hypothesis.tokens[cur_len - 1]);
      }
    }
    std::vector<float> scores = session.step(last);
    log_softmax(scores, vocab);
    process_scores(scores, vocab, flat, processors);
    bool all_hit = true;
    std::vector<int64_t> reorder_rows;
    for (int64_t n = 0; n < sources; ++n) {
      std::vector<float> candidates(static_cast<size_t>(beams * vocab));
      for (int64_t b = 0; b < beams; ++b) {
        const float* values = scores.data() + (n * beams + b) * vocab;
        for (int64_t v = 0; v < vocab; ++v) candidates[b * vocab + v] = values[v] + running[n][b].score;
      }
      const std::vector<int64_t> best = top_k(candidates.data(), beams * vocab, keep);
      std::vector<Hypothesis> top(static_cast<size_t>(keep));
      std::vector<bool> hits(static_cast<size_t>(keep));
      std::vector<float> top_scores(static_cast<size_t>(keep)), masked(static_cast<size_t>(keep));
      for (int64_t i = 0; i < keep; ++i) {
        const int64_t beam = best[i] / vocab, token = best[i] % vocab;
        top[i] = running[n][beam];
        top[i].tokens[cur_len] = token;
        top[i].indices[cur_len - prompt] = beam + n * beams;
        top_scores[i] = candidates[best[i]];
        hits[i] = token == s.eos || cur_len + 1 >= s.max_length;
        masked[i] = top_scores[i] + (hits[i] ? kBigNegative : 0.0f);
        all_hit = all_hit && hits[i];
      }
      const std::vector<int64_t> next = top_k(masked.data(), keep, beams);
      bool group_finished = true;
      for (const auto& hypothesis : done[n]) group_finished = group_finished && hypothesis.finished;
      std::vector<Hypothesis> merged = done[n];
      std::vector<float> merged_scores;
      for (const auto& hypothesis : done[n]) merged_scores.push_back(hypothesis.score);
      const float penalty = static_cast<float>(std::pow(static_cast<double>(cur_len + 1 - prompt), s.length_penalty));
      for (int64_t i = 0; i < keep; ++i) {
        const bool just_finished = hits[i] && i < beams;
        float candidate = top_scores[i] / penalty;
        if (group_finished && s.early_stopping == EarlyStopping::kTrue) candidate += kBigNegative;
        if (!improvable[n]) candidate += kBigNegative;
        if (!just_finished) candidate += kBigNegative;
        Hypothesis hypothesis = top[i];
        hypothesis.score = candidate;
        hypothesis.finished = just_finished;
        merged.push_back(hypothesis);
        merged_scores.push_back(candidate);
      }
      const std::vector<int64_t> chosen = top_k(merged_scores.data(), static_cast<int64_t>(merged.size()), beams);
      std::vector<Hypothesis> new_done;
      for (int64_t index : chosen) new_done.push_back(merged[index]);
      done[n] = std::move(new_done);
      for (int64_t b = 0; b < beams; ++b) {
        running[n][b] = top[next[b]];
        running[n][b].score = masked[next[b]];
        reorder_rows.push_back(running[n][b].indices[cur_len - prompt]);
      }
    }
    session.reorder(reorder_rows);
    ++cur_len;
    const bool never = s.early_stopping == EarlyStopping::kNever;
    const int best_length = (never && s.length_penalty > 0.0f) ? s.max_length - prompt : cur_len - prompt;
    const float divisor = static_cast<float>(std::pow(static_cast<double>(best_length), s.length_penalty));
    bool any_improvable = false, all_finished = true;
    for (int64_t n = 0; n < sources; ++n) {
      float worst = kBigNegative;
      bool finished = true;
      float minimum = std::numeric_limits<float>::infinity();
      for (const auto& hypothesis : done[n]) {
        minimum = std::min(minimum, hypothesis.score);
        finished = finished && hypothesis.finished;
      }
      bool better = false;
      for (const auto& hypothesis : done[n]) {
        worst = hypothesis.finished ? minimum : kBigNegative;
        better = better || running[n][0].score / divisor > worst;
      }
      improvable[n] = improvable[n] && better;
      any_improvable = any_improvable || improvable[n];
      all_finished = all_finished && finished;
    }
    const bool still_open = !(all_finished && s.early_stopping == EarlyStopping::kTrue);
    if (!(any_improvable && still_open && !all_hit)) break;
  }
  Rows out;
  size_t generated = 0;
  for (const auto& group : done) {
    for (int64_t r = 0; r < s.num_return_sequences; ++r) {
      const auto& indices = group[r].indices;
      generated = std::max<size_t>(generated, std::count_if(indices.begin(), indices.end(), [](int64_t i) { return i != -1; }));
    }
  }
  for (const auto& group : done) {
    for (int64_t r = 0; r < s.num_return_sequences; ++r) {
      out.emplace_back(group[r].tokens.begin(), group[r].tokens.begin() + prompt + generated);
    }
  }
  return out;
}

}  // namespace cbart
