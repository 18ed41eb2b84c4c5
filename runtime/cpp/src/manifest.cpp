#include "manifest.hpp"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cbart/runtime.hpp"
#include "contract.hpp"
#include "sha256.hpp"

namespace cbart {

namespace {
std::vector<std::string> names(const nlohmann::json& tensors) {
  std::vector<std::string> out;
  for (const auto& tensor : tensors) out.push_back(tensor.at("name").get<std::string>());
  return out;
}
}  // namespace

Manifest read_manifest(const std::string& directory, bool check_files, bool draft) {
  const std::string path = directory + "/manifest.json";
  std::ifstream file(path);
  if (!file) {
    throw Error(directory + " has no manifest.json; is it a directory written by `cbart export`?");
  }
  nlohmann::json data;
  try {
    file >> data;
  } catch (const nlohmann::json::exception& error) {
    throw Error(path + " is not valid JSON (" + error.what() + "); re-run `cbart export`");
  }
  if (data.value("format", "") != "cbart-export") throw Error(path + " is not a cbart export manifest");
  const int version = data.value("format_version", -1);
  if (version != kFormatVersion) {
    throw Error(directory + " uses export format version " + std::to_string(version) +
                ", but this runtime reads version " + std::to_string(kFormatVersion) +
                "; re-export the model with a matching cbart version");
  }
  Manifest manifest;
  try {
    manifest.backend = data.at("backend").get<std::string>();
    if (manifest.backend != "onnx") {
      throw Error(directory + " holds " + manifest.backend + " engines; the C++ runtime runs ONNX exports");
    }
    const auto& model = data.at("model");
    manifest.decoder_layers = model.at("decoder_layers");
    manifest.heads = model.at("decoder_attention_heads");
    manifest.head_dim = model.at("head_dim");
    manifest.vocab_size = model.at("vocab_size");
    manifest.max_source_positions = model.at("max_source_positions");
    const auto& tokens = data.at("tokens");
    manifest.bos = tokens.at("bos");
    manifest.pad = tokens.at("pad");
    manifest.eos = tokens.at("eos");
    manifest.decoder_start = tokens.at("decoder_start");
    if (!tokens.at("forced_bos").is_null()) manifest.forced_bos = tokens.at("forced_bos").get<int64_t>();
    if (!tokens.at("forced_eos").is_null()) manifest.forced_eos = tokens.at("forced_eos").get<int64_t>();
    for (const auto& [name, graph] : data.at("graphs").items()) {
      manifest.graph_files[name] = graph.at("file").get<std::string>();
      manifest.inputs[name] = names(graph.at("inputs"));
      manifest.outputs[name] = names(graph.at("outputs"));
    }
    check_contract(directory, manifest);
    const auto& logits_shape = data.at("graphs").at("decoder_step").at("outputs").at(0).at("shape");
    manifest.last_position_logits = logits_shape.at(1).is_number() && logits_shape.at(1).get<int>() == 1;
    const auto& step_inputs = manifest.inputs.at(DECODER_STEP);
    manifest.per_row_positions = std::find(step_inputs.begin(), step_inputs.end(), STEP_POSITIONS) != step_inputs.end();
    const auto& screen = data.value("lm_head_screen", nlohmann::json::object());
    if (!screen.empty()) {
      manifest.lm_head_rows = screen.at("rows").get<std::string>();
      manifest.lm_head_bounds = screen.at("bounds").get<std::string>();
    }
    for (const auto& weight : data.value("shared_weights", nlohmann::json::array())) {
      manifest.shared_weights.push_back({weight.at("file").get<std::string>(), weight.at("offset").get<int64_t>(),
                                         weight.at("dtype").get<std::string>(),
                                         weight.at("shape").get<std::vector<int64_t>>(),
                                         weight.at("initializers").get<std::map<std::string, std::vector<std::string>>>()});
    }
    const auto& pair = data.value("draft", nlohmann::json());
    if (pair.is_object()) manifest.draft_directory = pair.at("directory").get<std::string>();
    // The checkpoint's generation defaults, as the exporter resolved them (runtime/manifest.py
    // GenerationDefaults): the runtime hard-codes none. A field an older export lacks is "not set": its
    // processor is off; a missing max_length must then come with the request (inputs.cpp).
    const auto& generation = data.at("generation");
    const auto set = [&generation](const char* key) {
      return generation.contains(key) && !generation.at(key).is_null();
    };
    if (set("max_length")) manifest.max_length = generation.at("max_length").get<int>();
    if (set("max_new_tokens")) manifest.max_new_tokens = generation.at("max_new_tokens").get<int>();
    if (set("min_length")) manifest.min_length = generation.at("min_length");
    if (set("min_new_tokens")) manifest.min_new_tokens = generation.at("min_new_tokens").get<int>();
    if (set("num_beams")) manifest.num_beams = generation.at("num_beams");
    if (set("num_return_sequences")) manifest.num_return_sequences = generation.at("num_return_sequences");
    if (set("no_repeat_ngram_size")) manifest.no_repeat_ngram_size = generation.at("no_repeat_ngram_size");
    if (set("length_penalty")) manifest.length_penalty = generation.at("length_penalty");
    if (set("repetition_penalty")) manifest.repetition_penalty = generation.at("repetition_penalty");
    if (set("do_sample")) manifest.do_sample = generation.at("do_sample");
    if (set("early_stopping")) {
      const auto& stop = generation.at("early_stopping");
      manifest.early_stopping = stop.is_string() ? stop.get<std::string>() : (stop.get<bool>() ? "true" : "false");
    }
    if (check_files) {
      for (const auto& [name, entry] : data.at("files").items()) {
        const std::string file_path = directory + "/" + name;
        if (!std::ifstream(file_path)) {
          throw Error(directory + " is missing " + name + ", listed in its manifest; re-run `cbart export`");
        }
        if (sha256_file(file_path) != entry.at("sha256").get<std::string>()) {
          throw Error(name + " in " + directory +
                      " does not match its manifest (sha256): the file was modified or corrupted; re-run `cbart export`");
        }
      }
    }
  } catch (const nlohmann::json::exception& error) {
    throw Error(path + " is incomplete or malformed: " + error.what());
  }
  for (const char* graph : {"encoder", "cross_kv", "decoder_step"}) {
    if (draft && std::string(graph) == "encoder") continue;
    if (!manifest.graph_files.count(graph)) throw Error(path + " lists no " + std::string(graph) + " graph");
  }
  return manifest;
}

}  // namespace cbart
