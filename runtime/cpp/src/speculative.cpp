// Speculative greedy decoding, a port of runtime/speculative.py (same names, same order): the draft
// proposes k tokens, the full decoder scores the last accepted token and the k proposals in one step, and
// its own greedy choices are kept up to the first disagreement -- exactly the full model's greedy output.
#include <algorithm>

#include "search.hpp"

namespace cbart {
namespace {

// Row `row`'s logits at position `position` of a rows x count x vocab block, as a rows x vocab block's row.
std::vector<float> at_position(const std::vector<float>& logits, int64_t rows, int64_t count, int64_t vocab,
                               int64_t position) {
  std::vector<float> scores(static_cast<size_t>(rows * vocab));
  for (int64_t row = 0; row < rows; ++row) {
    const float* source = logits.data() + (row * count + position) * vocab;
    std::copy(source, source + vocab, scores.begin() + row * vocab);
  }
  return scores;
}

Rows prefixes(const Rows& proposal, size_t length) {
  Rows out;
  out.reserve(proposal.size());
  for (const auto& row : proposal) out.emplace_back(row.begin(), row.begin() + static_cast<std::ptrdiff_t>(length));
  return out;
}

std::vector<int64_t> tokens_from(const Rows& sequences, size_t start) {
  std::vector<int64_t> tokens;
  for (const auto& row : sequences) tokens.insert(tokens.end(), row.begin() + static_cast<std::ptrdiff_t>(start), row.end());
  return tokens;
}

int64_t argmax(const std::vector<float>& scores, int64_t row, int64_t vocab) {
  const float* values = scores.data() + row * vocab;
  return std::max_element(values, values + vocab) - values;
}

}  // namespace

DraftLength::DraftLength(int start, int maximum, bool adaptive, int probe_interval, int max_probe_interval)
    : start_(start), maximum_(maximum), adaptive_(adaptive), probe_interval_(probe_interval),
      max_probe_interval_(max_probe_interval), current_(start), interval_(probe_interval) {
  if (start < 1 || start > maximum) {
    throw Error("the draft length must be between 1 and " + std::to_string(maximum) + ", got " +
                std::to_string(start));
  }
}

int DraftLength::propose() {
  if (current_ > 0) return current_;
  if (wait_ > 0) {
    --wait_;
    return 0;
  }
  return 1;
}

void DraftLength::update(int proposed, int accepted) {
  if (!adaptive_ || proposed == 0) return;
  if (accepted == proposed) {
    current_ = std::min(proposed + 1, maximum_);
    interval_ = probe_interval_;
  } else if (accepted == 0) {
    current_ = proposed - 1;
    if (current_ == 0) {
      wait_ = interval_;
      interval_ = std::min(2 * interval_, max_probe_interval_);
    }
  } else {
    current_ = proposed;
  }
}

Rows speculative_greedy(DecoderSession& full, DecoderSession& draft, int64_t rows, const SearchSettings& s,
                        DraftLength& draft_length, SpeculationStats& stats) {
  if (s.num_beams > 1) throw Error("speculative decoding is greedy; drop num_beams > 1, or speculative");
  const int64_t vocab = full.vocab();
  // The screen needs every processor to mask or force tokens only: no repetition penalty. It pays for a
  // plain step (k = 0) and a one-token probe (k = 1); over longer runs the exact head serves all k + 1
  // positions at once, cheaper than refining each.
  const LogitsProcessors processors = logits_processors(s);
  const bool screened = full.screened() && masks_only(processors);
  Rows sequences(static_cast<size_t>(rows), std::vector<int64_t>{s.decoder_start});
  std::vector<bool> unfinished(static_cast<size_t>(rows), true);
  size_t draft_fed = 0;  // tokens of `sequences` in the draft's cache; the full cache holds all but the last
  while (true) {
    const size_t length = sequences[0].size();
    const int k = std::min(draft_length.propose(), s.max_length - static_cast<int>(length) - 1);
    Rows proposal = sequences;
    std::vector<bool> proposing = unfinished;
    for (int i = 0; i < k; ++i) {
      const int64_t count = static_cast<int64_t>(proposal[0].size() - draft_fed);
      std::vector<float> scores = draft.step_last(tokens_from(proposal, draft_fed), count);
      draft_fed = proposal[0].size();
      process_scores(scores, vocab, proposal, processors);
      for (int64_t row = 0; row < rows; ++row) {
        const int64_t token = proposing[row] ? argmax(scores, row, vocab) : s.pad;
        if (token == s.eos) proposing[row] = false;
        proposal[row].push_back(token);
      }
    }
    const std::vector<int64_t> fed = tokens_from(proposal, length - 1);
    const bool use_screen = screened && k <= 1;
    const std::vector<float> logits =
        use_screen ? full.step_all_screened(fed, k + 1) : full.step_all(fed, k + 1);
    Rows appended;  // per position, one token per row
    int accepted = 0;
    for (int position = 0; position <= k; ++position) {
      std::vector<float> scores = at_position(logits, rows, k + 1, vocab, position);
      process_scores(scores, vocab, prefixes(proposal, length + position), processors);
      if (use_screen) full.refine(scores, position);
      std::vector<int64_t> tokens(static_cast<size_t>(rows));
      bool agrees = position < k, any = false;
      for (int64_t row = 0; row < rows; ++row) {
        tokens[row] = unfinished[row] ? argmax(scores, row, vocab) : s.pad;
        if (tokens[row] == s.eos) unfinished[row] = false;
        any = any || unfinished[row];
        agrees = agrees && tokens[row] == proposal[row][length + position];
      }
      appended.push_back(tokens);
      accepted += agrees ? 1 : 0;
      if (!agrees || !any) break;
    }
    for (const auto& tokens : appended) {
      for (int64_t row = 0; row < rows; ++row) sequences[row].push_back(tokens[row]);
    }
    stats.full_calls += 1;
    stats.draft_calls += k;
    stats.proposed += k;
    stats.accepted += accepted;
    stats.steps += static_cast<int64_t>(appended.size());
    draft_length.update(k, accepted);
    const size_t kept = sequences[0].size() - 1;
    if (length + k > kept) full.truncate(static_cast<int64_t>(kept));
    if (draft_fed > kept) {
      draft.truncate(static_cast<int64_t>(kept));
      draft_fed = kept;
    }
    const bool any = std::find(unfinished.begin(), unfinished.end(), true) != unfinished.end();
    if (!any || static_cast<int>(sequences[0].size()) >= s.max_length) return sequences;
  }
}

}  // namespace cbart
