#include "contract.hpp"

#include <algorithm>

#include "cbart/runtime.hpp"

namespace cbart {

std::vector<std::string> cache_names(const std::string& prefix, int layers) {
  std::vector<std::string> names;
  for (int layer = 0; layer < layers; ++layer) {
    for (const char* kind : {"key", "value"}) names.push_back(prefix + "_" + kind + "_" + std::to_string(layer));
  }
  return names;
}

std::map<std::string, std::pair<std::vector<std::string>, std::vector<std::string>>> contract_names(
    const Manifest& manifest) {
  const int layers = manifest.decoder_layers;
  std::vector<std::string> step_inputs{STEP_INPUT_IDS, STEP_ENCODER_MASK};
  for (const std::string& prefix : {PAST, CROSS}) {
    for (auto& name : cache_names(prefix, layers)) step_inputs.push_back(name);
  }
  std::vector<std::string> step_outputs{STEP_LOGITS};
  for (auto& name : cache_names(PRESENT, layers)) step_outputs.push_back(name);
  return {{CROSS_KV, {{}, cache_names(CROSS, layers)}}, {DECODER_STEP, {step_inputs, step_outputs}}};
}

void check_contract(const std::string& directory, const Manifest& manifest) {
  for (const auto& [graph, names] : contract_names(manifest)) {
    if (manifest.inputs.count(graph) == 0) {
      throw Error(directory + " has no " + graph + " graph in its manifest; re-run `cbart export`");
    }
    const std::pair<const char*, const std::vector<std::string>*> sides[] = {{"input", &manifest.inputs.at(graph)},
                                                                            {"output", &manifest.outputs.at(graph)}};
    const std::vector<std::string>* wanted[] = {&names.first, &names.second};
    for (int side = 0; side < 2; ++side) {
      const std::vector<std::string>& present = *sides[side].second;
      for (const std::string& name : *wanted[side]) {
        if (std::find(present.begin(), present.end(), name) == present.end()) {
          throw Error(graph + " in " + directory + " has no " + sides[side].first + " '" + name +
                      "'; the runtimes bind " + sides[side].first + "s by name. Re-export with `cbart export`");
        }
      }
    }
  }
}

}  // namespace cbart
