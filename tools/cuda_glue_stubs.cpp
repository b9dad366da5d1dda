// Host stand-ins for the libc10_cuda symbols python/cuda_ops.cpp references, used only by
// tools/check_cuda_glue.sh to load the glue into a CPU-only torch. Never called for real.
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDACachingAllocator.h>
namespace c10 { namespace cuda {
DeviceIndex device_count() noexcept { return 0; }
cudaError_t GetDevice(DeviceIndex* d) { *d = 0; return cudaSuccess; }
cudaError_t SetDevice(DeviceIndex, const bool) { return cudaSuccess; }
cudaError_t MaybeSetDevice(DeviceIndex) { return cudaSuccess; }
DeviceIndex ExchangeDevice(DeviceIndex d) { return d; }
CUDAStream getStreamFromPool(const bool, DeviceIndex) { TORCH_CHECK(false, "stub"); }
CUDAStream getStreamFromPool(const int, DeviceIndex) { TORCH_CHECK(false, "stub"); }
CUDAStream getDefaultCUDAStream(DeviceIndex) { TORCH_CHECK(false, "stub"); }
CUDAStream getCurrentCUDAStream(DeviceIndex) { TORCH_CHECK(false, "stub getCurrentCUDAStream"); }
void setCurrentCUDAStream(CUDAStream) {}
bool CUDAStream::query() const { return true; }
void CUDAStream::synchronize() const {}
cudaStream_t CUDAStream::stream() const { return nullptr; }
void c10_cuda_check_implementation(const int32_t, const char*, const char*, const uint32_t, const bool) {}
namespace CUDACachingAllocator { std::atomic<CUDAAllocator*> allocator; }
}}
