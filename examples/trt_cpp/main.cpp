// Load a graphopt --target trt artifact's engine.plan by following its manifest.json, and run one decode step.
//
// Everything comes from the manifest: the engine file and the TensorRT version that built it,
// every I/O tensor (name, dtype, symbolic shape, role), the static cache length, the past→present aliases
// (one device buffer bound to both names: TensorRT updates the cache in place), and the optimization
// profiles. Usage: graphopt_trt_example ARTIFACT_DIR [BATCH]
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

using json = nlohmann::json;

namespace {
struct Logger : nvinfer1::ILogger {
    void log(Severity severity, const char* msg) noexcept override {
        if (severity <= Severity::kWARNING) std::cerr << "[trt] " << msg << "\n";
    }
} gLogger;

#define CHECK_CUDA(call) do { cudaError_t e = (call); if (e != cudaSuccess) { \
    std::cerr << "CUDA error " << cudaGetErrorString(e) << " at " #call "\n"; std::exit(1); } } while (0)

std::string readFile(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) { std::cerr << "cannot read " << path << "\n"; std::exit(1); }
    std::stringstream ss; ss << in.rdbuf(); return ss.str();
}

size_t elementSize(const std::string& dtype) {
    static const std::map<std::string, size_t> sizes{{"float32", 4}, {"float16", 2}, {"bfloat16", 2},
                                                     {"int64", 8}, {"int32", 4}};
    return sizes.at(dtype);
}

// Concrete dims of one tensor: symbolic dims take the decode profile's value for this batch.
nvinfer1::Dims concreteDims(const json& spec, int batch) {
    nvinfer1::Dims dims{};
    dims.nbDims = static_cast<int>(spec["shape"].size());
    for (int i = 0; i < dims.nbDims; ++i) {
        const json& d = spec["shape"][i];
        dims.d[i] = d.is_number() ? d.get<int64_t>() : (d.get<std::string>() == "batch" ? batch : 1);
    }
    return dims;
}

size_t volume(const nvinfer1::Dims& dims) {
    size_t n = 1; for (int i = 0; i < dims.nbDims; ++i) n *= static_cast<size_t>(dims.d[i]); return n;
}
}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) { std::cerr << "usage: " << argv[0] << " ARTIFACT_DIR [BATCH]\n"; return 2; }
    const std::string dir = argv[1];
    const int batch = argc > 2 ? std::stoi(argv[2]) : 1;
    const json m = json::parse(readFile(dir + "/manifest.json"));
    if (m["format"] != "graphopt-artifact" || m["target"] != "trt") {
        std::cerr << dir << " is not a graphopt trt artifact; build it with graphopt build --target trt\n"; return 2;
    }
    const json& engineInfo = m["trt"]["engine"];
    if (engineInfo.is_null()) { std::cerr << "no engine.plan yet: run 'graphopt engine " << dir << "'\n"; return 2; }
    const int v = getInferLibVersion();
    std::cout << "engine built with TensorRT " << engineInfo["tensorrt"].get<std::string>() << ", runtime "
              << v / 10000 << "." << (v / 100) % 100 << "." << v % 100 << "\n";
    for (const json& plugin : m["plugins"])  // the FlashAttention plugin is AOT: its PTX is inside the plan
        std::cout << "plugin " << plugin["namespace"].get<std::string>() << "::" << plugin["name"].get<std::string>()
                  << " v" << plugin["version"].get<std::string>() << "\n";

    std::unique_ptr<nvinfer1::IRuntime> runtime{nvinfer1::createInferRuntime(gLogger)};
    const std::string plan = readFile(dir + "/" + engineInfo["file"].get<std::string>());
    std::unique_ptr<nvinfer1::ICudaEngine> engine{runtime->deserializeCudaEngine(plan.data(), plan.size())};
    if (!engine) { std::cerr << "deserializing failed: rebuild with 'graphopt engine " << dir << " --force'\n"; return 1; }
    std::unique_ptr<nvinfer1::IExecutionContext> context{engine->createExecutionContext()};
    cudaStream_t stream; CHECK_CUDA(cudaStreamCreate(&stream));
    int decodeProfile = 0;
    for (size_t i = 0; i < m["optimization_profiles"].size(); ++i)
        if (m["optimization_profiles"][i]["name"] == "decode") decodeProfile = static_cast<int>(i);
    context->setOptimizationProfileAsync(decodeProfile, stream);

    std::map<std::string, void*> buffers;  // one device buffer per past tensor, shared with its present alias
    for (const json& spec : m["io"]["inputs"]) {
        const std::string name = spec["name"];
        const nvinfer1::Dims dims = concreteDims(spec, batch);
        void* ptr = nullptr;
        const size_t bytes = volume(dims) * elementSize(spec["dtype"]);
        CHECK_CUDA(cudaMalloc(&ptr, bytes)); CHECK_CUDA(cudaMemset(ptr, 0, bytes));  // token 0, empty cache
        buffers[name] = ptr;
        context->setInputShape(name.c_str(), dims);
        context->setTensorAddress(name.c_str(), ptr);
    }
    const int vocab = m["model"]["vocab_size"];
    void* logits = nullptr;
    CHECK_CUDA(cudaMalloc(&logits, sizeof(float) * batch * vocab));
    for (const json& spec : m["io"]["outputs"]) {
        const std::string name = spec["name"];
        if (spec["role"] == "logits") { context->setTensorAddress(name.c_str(), logits); continue; }
        const std::string past = m["kv_cache"]["aliases"][name];  // present_key.i -> past_key.i: same memory
        context->setTensorAddress(name.c_str(), buffers.at(past));
    }
    if (!context->enqueueV3(stream)) { std::cerr << "enqueueV3 failed\n"; return 1; }
    std::vector<float> host(static_cast<size_t>(batch) * vocab);
    CHECK_CUDA(cudaMemcpyAsync(host.data(), logits, host.size() * sizeof(float), cudaMemcpyDeviceToHost, stream));
    CHECK_CUDA(cudaStreamSynchronize(stream));
    for (int b = 0; b < batch; ++b) {
        const float* row = host.data() + static_cast<size_t>(b) * vocab;
        int best = 0; for (int i = 1; i < vocab; ++i) if (row[i] > row[best]) best = i;
        std::cout << "row " << b << ": next token " << best << " (cache length "
                  << m["trt"]["cache_capacity"].get<int>() << ", " << m["model"]["num_layers"].get<int>()
                  << " layers)\n";
    }
    for (auto& [name, ptr] : buffers) cudaFree(ptr);
    cudaFree(logits); cudaStreamDestroy(stream);
    return 0;
}
