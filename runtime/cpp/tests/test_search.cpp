// Unit tests of the search algorithms and SHA-256 that need no ONNX Runtime (run by ctest).
#include <cassert>
#include <cmath>
#include <iostream>
#include <map>

#include "../src/search.hpp"
#include "../src/sha256.hpp"

namespace {

int failures = 0;
void check(bool condition, const char* what) {
  if (!condition) {
    std::cerr << "FAILED: " << what << "\n";
    ++failures;
  }
}

// A fake decoder whose next-token preferences depend only on the previous token: prev -> prev + 1,
// and after token 5 the end-of-sequence token (2) is best.
class Counting final : public cbart::DecoderSession {
 public:
  std::vector<float> step(const std::vector<int64_t>& tokens) override {
    std::vector<float> logits(tokens.size() * 8, 0.0f);
    for (size_t row = 0; row < tokens.size(); ++row) {
      const int64_t best = tokens[row] >= 5 ? 2 : (tokens[row] == 2 ? 3 : tokens[row] + 1);
      logits[row * 8 + best] = 5.0f;
      logits[row * 8 + (best + 1) % 8] = 4.0f;
    }
    return logits;
  }
  void reorder(const std::vector<int64_t>&) override {}
  int64_t vocab() const override { return 8; }
};

}  // namespace

int main() {
  check(cbart::sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "sha256(abc)");
  check(cbart::sha256_hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "sha256('')");

  cbart::SearchSettings settings;
  settings.max_length = 10;
  Counting session;
  auto greedy = cbart::greedy_search(session, 2, settings);
  const std::vector<int64_t> expected{2, 3, 4, 5, 2};
  check(greedy[0] == expected && greedy[1] == expected, "greedy follows the fake model and stops at EOS");

  settings.min_length = 7;
  greedy = cbart::greedy_search(session, 1, settings);
  check(greedy[0].size() >= 7, "min_length keeps EOS away");

  settings = {};
  settings.max_length = 4;
  greedy = cbart::greedy_search(session, 1, settings);
  check(greedy[0].size() == 4, "max_length bounds the output");

  settings = {};
  settings.max_length = 12;
  settings.num_beams = 3;
  auto beams = cbart::beam_search(session, 2, settings);
  check(beams.size() == 2 && beams[0] == expected, "beam search finds the best sequence");

  std::vector<float> scores(8, 0.0f);
  settings = {};
  settings.no_repeat_ngram_size = 2;
  cbart::process_scores(scores, 8, {{2, 3, 4, 3}}, settings);
  check(std::isinf(scores[4]) && !std::isinf(scores[5]), "no-repeat-ngram bans the repeated bigram continuation");

  if (failures == 0) std::cout << "all search tests passed\n";
  return failures == 0 ? 0 : 1;
}
