// Logits processors as named objects, one per generation rule: a one-to-one mirror of runtime/processors.py
// (same names, same order; tests/test_cpp_runtime.py compares the lists both runtimes report). Built in one
// place, in transformers' order, which the token-exact contract with model.generate() depends on.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace cbart {

struct SearchSettings;

class LogitsProcessor {
 public:
  virtual ~LogitsProcessor() = default;
  virtual std::string name() const = 0;
  // Only sets scores to -inf or forces one token, never rescales: the screened LM head may serve the step.
  virtual bool masks_only() const = 0;
  // Edits one row's scores (`vocab` values) in place, given that row's tokens so far.
  virtual void apply(float* scores, int64_t vocab, const std::vector<int64_t>& tokens) const = 0;
};

using LogitsProcessors = std::vector<std::unique_ptr<LogitsProcessor>>;

// The processors `settings` switch on, in transformers' order.
LogitsProcessors logits_processors(const SearchSettings& settings);

// Whether every processor only masks or forces tokens.
bool masks_only(const LogitsProcessors& processors);

std::vector<std::string> names(const LogitsProcessors& processors);

}  // namespace cbart
