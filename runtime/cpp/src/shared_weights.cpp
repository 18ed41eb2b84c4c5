#include "shared_weights.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <functional>
#include <numeric>

#include "cbart/runtime.hpp"

namespace cbart {

MappedRegion::MappedRegion(const std::string& path, int64_t offset, size_t bytes) {
  const int descriptor = ::open(path.c_str(), O_RDONLY);
  if (descriptor < 0) throw Error("cannot open " + path + "; re-run `cbart export`");
  const int64_t page = ::sysconf(_SC_PAGESIZE);
  const int64_t start = offset - offset % page;  // mmap offsets are page-aligned
  mapped_bytes_ = bytes + static_cast<size_t>(offset - start);
  mapping_ = ::mmap(nullptr, mapped_bytes_, PROT_READ, MAP_PRIVATE, descriptor, start);
  ::close(descriptor);
  if (mapping_ == MAP_FAILED) {
    mapping_ = nullptr;
    throw Error("cannot map " + path + "; re-run `cbart export`");
  }
  data_ = static_cast<const char*>(mapping_) + (offset - start);
}

MappedRegion::~MappedRegion() {
  if (mapping_) ::munmap(mapping_, mapped_bytes_);
}

SharedWeights::SharedWeights(const std::string& directory, const std::vector<SharedWeight>& specs,
                             const LogitScreen* screen, const std::string& rows_file)
    : specs_(specs) {
  const Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeDefault);
  for (const SharedWeight& spec : specs_) {
    if (spec.dtype != "float32") {
      throw Error(directory + ": shared weight " + spec.file + " is " + spec.dtype +
                  "; this runtime shares float32 tensors only; re-run `cbart export`");
    }
    const size_t count = static_cast<size_t>(
        std::accumulate(spec.shape.begin(), spec.shape.end(), int64_t{1}, std::multiplies<int64_t>()));
    const void* data = nullptr;
    if (screen != nullptr && spec.file == rows_file) {
      data = screen->rows_data();
    } else {
      regions_.push_back(std::make_unique<MappedRegion>(directory + "/" + spec.file, spec.offset, count * sizeof(float)));
      data = regions_.back()->data();
    }
    // ONNX Runtime only reads initializers; the mapping is read-only
    values_.push_back(Ort::Value::CreateTensor<float>(memory, static_cast<float*>(const_cast<void*>(data)), count,
                                                      spec.shape.data(), spec.shape.size()));
  }
}

void SharedWeights::options_for(const std::string& graph, Ort::SessionOptions& options) const {
  for (size_t index = 0; index < specs_.size(); ++index) {
    const auto found = specs_[index].initializers.find(graph);
    if (found == specs_[index].initializers.end()) continue;
    for (const std::string& name : found->second) options.AddInitializer(name.c_str(), values_[index]);
  }
}

}  // namespace cbart
