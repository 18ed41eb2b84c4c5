// manifest.json of an export directory: the contract written by `cbart export` (format version 1).
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace cbart {

constexpr int kFormatVersion = 1;

// A tensor several sessions read: runtime/manifest.py SharedWeight.
struct SharedWeight {
  std::string file;
  int64_t offset = 0;
  std::string dtype;
  std::vector<int64_t> shape;
  std::map<std::string, std::vector<std::string>> initializers;  // graph name -> its initializers over these bytes
};

struct Manifest {
  int decoder_layers = 0, heads = 0, head_dim = 0, vocab_size = 0, max_source_positions = 0;
  int64_t bos = 0, pad = 1, eos = 2, decoder_start = 2;
  std::optional<int64_t> forced_bos, forced_eos;
  std::map<std::string, std::string> graph_files;                  // graph name -> file
  std::map<std::string, std::vector<std::string>> inputs, outputs;  // graph name -> tensor names
  // generation defaults: the checkpoint's, read from the manifest. Nothing is hard-coded: an unset field
  // leaves its rule off (the values below), and an unset max_length must come with the request.
  std::optional<int> max_length, max_new_tokens, min_new_tokens;  // new tokens take precedence (transformers)
  int min_length = 0, num_beams = 1, no_repeat_ngram_size = 0, num_return_sequences = 1;
  bool do_sample = false;
  float length_penalty = 1.0f, repetition_penalty = 1.0f;
  std::string early_stopping = "false";
  std::string backend;
  // the screened LM head's files (fp32 ONNX exports); empty when the export has none
  std::string lm_head_rows, lm_head_bounds;
  // tensors several sessions read, mapped once (shared_weights.hpp); empty in exports written before them
  std::vector<SharedWeight> shared_weights;
  // a speculative pair's draft export, relative to this directory; empty when there is none
  std::string draft_directory;
  // the decoder step returns logits at the last new position only (rows x 1 x vocab): a pair's draft
  bool last_position_logits = false;
  // the decoder step takes per-row positions and a self-attention mask (an --inflight export, Manifest.per_row_positions)
  bool per_row_positions = false;
};

// Reads and validates DIR/manifest.json; with check_files, every listed file's sha256 is verified.
// A pair's draft (`draft`) has no encoder graph: it reads the full model's encoder output.
Manifest read_manifest(const std::string& directory, bool check_files, bool draft = false);

}  // namespace cbart
