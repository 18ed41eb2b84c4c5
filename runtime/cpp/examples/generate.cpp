// cbart-generate: token ids in, token ids out, one JSON object per line.
//
//   echo '{"input_ids": [[0, 31414, 232, 2]], "num_beams": 4, "max_new_tokens": 20}' | cbart-generate EXPORT_DIR
//
// Each input line holds "input_ids" (a list of token-id lists) and optional generation settings
// (max_new_tokens, max_length, min_new_tokens, min_length, num_beams, length_penalty, early_stopping,
// no_repeat_ngram_size, repetition_penalty, num_return_sequences, do_sample (false only), and "speculative":
// true or k for a pair export); each output line holds "sequences", "processors" (the logits processors
// applied, in order), the encode/decode milliseconds and, when speculative, the draft's statistics. Errors go
// to stderr, with exit status 1.
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>

#include "cbart/runtime.hpp"

namespace {

template <typename T>
void read(const nlohmann::json& request, const char* key, std::optional<T>& target) {
  if (request.contains(key) && !request.at(key).is_null()) target = request.at(key).get<T>();
}

cbart::GenerationOptions options_from(const nlohmann::json& request) {
  cbart::GenerationOptions options;
  read(request, "max_new_tokens", options.max_new_tokens);
  read(request, "max_length", options.max_length);
  read(request, "min_new_tokens", options.min_new_tokens);
  read(request, "min_length", options.min_length);
  read(request, "num_beams", options.num_beams);
  read(request, "no_repeat_ngram_size", options.no_repeat_ngram_size);
  read(request, "num_return_sequences", options.num_return_sequences);
  read(request, "length_penalty", options.length_penalty);
  read(request, "repetition_penalty", options.repetition_penalty);
  read(request, "do_sample", options.do_sample);
  read(request, "truncation", options.truncation);
  if (request.contains("early_stopping")) {
    const auto& stop = request.at("early_stopping");
    options.early_stopping = stop.is_string() ? stop.get<std::string>() : (stop.get<bool>() ? "true" : "false");
  }
  if (request.contains("speculative")) {  // true: adaptive draft length (0); an integer k: fixed; false: off
    const auto& speculative = request.at("speculative");
    if (speculative.is_boolean()) {
      if (speculative.get<bool>()) options.speculative = 0;
    } else {
      options.speculative = speculative.get<int>();
      if (*options.speculative < 1) throw cbart::Error("speculative must be true, false or a draft length >= 1");
    }
  }
  return options;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help") {
    std::cerr << "usage: cbart-generate EXPORT_DIR [--threads N] < requests.jsonl > results.jsonl\n";
    return argc < 2 ? 2 : 0;
  }
  cbart::RuntimeOptions runtime_options;
  for (int i = 2; i + 1 < argc; i += 2) {
    if (std::string(argv[i]) == "--threads") runtime_options.threads = std::stoi(argv[i + 1]);
  }
  try {
    auto runtime = cbart::Runtime::open(argv[1], runtime_options);
    std::string line;
    int number = 0;
    while (std::getline(std::cin, line)) {
      ++number;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      nlohmann::json request;
      try {
        request = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& error) {
        throw cbart::Error("line " + std::to_string(number) + " is not valid JSON: " + error.what());
      }
      if (!request.contains("input_ids")) throw cbart::Error("line " + std::to_string(number) + " has no input_ids");
      const auto inputs = request.at("input_ids").get<std::vector<cbart::Sequence>>();
      const auto result = runtime->generate(inputs, options_from(request));
      if (result.truncated > 0) {
        std::cerr << "cbart-generate: warning: truncating " << result.truncated
                  << " input(s) to the model's maximum of " << runtime->max_source_length() << " tokens\n";
      }
      nlohmann::json response{{"sequences", result.sequences},
                              {"processors", result.processors},
                              {"encode_ms", result.encode_ms},
                              {"decode_ms", result.decode_ms}};
      if (result.speculation) {
        const auto& stats = *result.speculation;
        response["speculation"] = {{"full_calls", stats.full_calls}, {"draft_calls", stats.draft_calls},
                                   {"proposed", stats.proposed}, {"accepted", stats.accepted},
                                   {"steps", stats.steps}};
      }
      std::cout << response.dump() << "\n" << std::flush;
    }
  } catch (const std::exception& error) {
    std::cerr << "cbart-generate: error: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
