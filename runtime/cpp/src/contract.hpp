// The named export contract, mirrored one to one from runtime/manifest.py (same names, same order): the
// graphs of an export directory and the tensors the runtime binds by name. Both runtimes check it when they
// read a manifest; tests/test_cpp_runtime.py breaks each name of a real export's contract in turn and
// checks that Python and C++ refuse it naming the same tensor.
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "manifest.hpp"

namespace cbart {

inline const std::string ENCODER = "encoder", AUTOENCODER = "autoencoder", CROSS_KV = "cross_kv",
                         DECODER_STEP = "decoder_step";
inline const std::string STEP_INPUT_IDS = "input_ids", STEP_ENCODER_MASK = "encoder_attention_mask",
                         STEP_LOGITS = "logits";
inline const std::string PAST = "past", PRESENT = "present", CROSS = "cross";
// --inflight exports only: each row's positions and the cache entries it may attend to.
inline const std::string STEP_POSITIONS = "positions", STEP_SELF_MASK = "self_attention_mask";

// prefix_key_0, prefix_value_0, prefix_key_1, ...: the per-layer cache tensors of a decoder step.
std::vector<std::string> cache_names(const std::string& prefix, int layers);

// graph -> (inputs, outputs) that graph must have.
std::map<std::string, std::pair<std::vector<std::string>, std::vector<std::string>>> contract_names(
    const Manifest& manifest);

// Throws, naming the tensor, when a graph lacks a name the runtime binds.
void check_contract(const std::string& directory, const Manifest& manifest);

}  // namespace cbart
