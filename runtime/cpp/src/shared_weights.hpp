// Tensors that several sessions read (the manifest's "shared_weights", written by
// exporter/external_weights.py): mapped once and handed to every session that reads them, as the Python
// backend's SharedWeights does (runtime/backends/onnxruntime.py). ONNX Runtime would otherwise map the same
// bytes once per session, and every mapping counts in full against the process's resident memory.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <memory>
#include <string>
#include <vector>

#include "lm_head_screen.hpp"
#include "manifest.hpp"

namespace cbart {

// A read-only mapping of `bytes` bytes of a file from `offset` on.
class MappedRegion {
 public:
  MappedRegion(const std::string& path, int64_t offset, size_t bytes);
  ~MappedRegion();
  MappedRegion(const MappedRegion&) = delete;
  MappedRegion& operator=(const MappedRegion&) = delete;

  const void* data() const { return data_; }

 private:
  void* mapping_ = nullptr;
  size_t mapped_bytes_ = 0;
  const void* data_ = nullptr;
};

class SharedWeights {
 public:
  // `screen`: the screened LM head, whose mapping of its rows file serves the tensors stored there.
  SharedWeights(const std::string& directory, const std::vector<SharedWeight>& specs, const LogitScreen* screen,
                const std::string& rows_file);
  SharedWeights(const SharedWeights&) = delete;
  SharedWeights& operator=(const SharedWeights&) = delete;

  // Adds the tensors `graph` reads to its session options; the sessions read them while this object lives.
  void options_for(const std::string& graph, Ort::SessionOptions& options) const;

 private:
  std::vector<SharedWeight> specs_;
  std::vector<std::unique_ptr<MappedRegion>> regions_;
  std::vector<Ort::Value> values_;
};

}  // namespace cbart
