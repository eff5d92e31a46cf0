// calm_edge::Model: checks the package (manifest, format version, sha256 of every file), loads the
// tokenizer, and opens one ONNX Runtime session per graph on the chosen execution provider.
#include <algorithm>

#include "model_impl.hpp"

namespace calm_edge {
namespace {

// One ONNX Runtime environment per process, shared by every Model (its creation is not cheap and
// ONNX Runtime expects a single one).
Ort::Env& ort_environment() {
  static Ort::Env environment(ORT_LOGGING_LEVEL_WARNING, "calm-edge");
  return environment;
}

std::string available_providers() {
  std::string names;
  for (const std::string& name : Ort::GetAvailableProviders()) {
    if (name == "CPUExecutionProvider") names += std::string(names.empty() ? "" : ", ") + "cpu";
    if (name == "CUDAExecutionProvider") names += std::string(names.empty() ? "" : ", ") + "cuda";
  }
  return names;
}

Ort::SessionOptions session_options(const ModelOptions& options) {
  if (options.threads < 0)
    throw Error("threads=" + std::to_string(options.threads) + " must be at least 1 (or 0 for ONNX Runtime's choice)");
  Ort::SessionOptions session_options;
  if (options.threads > 0) {
    session_options.SetIntraOpNumThreads(options.threads);
    session_options.SetInterOpNumThreads(1);
  }
  // The spinning policies of the Python runtime (runtime/model.py says why "run" is the default:
  // with ONNX Runtime's own, CALM's three sessions spin against each other).
  if (options.spinning == "off") {
    session_options.AddConfigEntry("session.intra_op.allow_spinning", "0");
  } else if (options.spinning == "run" || options.spinning == "on") {
    session_options.AddConfigEntry("session.intra_op.allow_spinning", "1");
    if (options.spinning == "run") session_options.AddConfigEntry("session.force_spinning_stop", "1");
  } else {
    throw Error("spinning='" + options.spinning + "': choose one of off, run, on");
  }
  if (options.provider == "cpu") return session_options;
  if (options.provider == "tensorrt")
    throw Error("provider 'tensorrt' is not in the C++ runtime yet (it offers: cpu, cuda); use cuda, or the "
                "Python runtime for TensorRT");
  if (options.provider != "cuda")
    throw Error("unknown provider '" + options.provider + "'; the C++ runtime offers: cpu, cuda");
  const auto have = Ort::GetAvailableProviders();
  if (std::find(have.begin(), have.end(), "CUDAExecutionProvider") == have.end())
    throw Error("provider 'cuda' is not available in this ONNX Runtime build (available: " + available_providers() +
                "); link the library against a GPU build of ONNX Runtime (see README.md, C++ runtime)");
  OrtCUDAProviderOptionsV2* cuda = nullptr;
  Ort::ThrowOnError(Ort::GetApi().CreateCUDAProviderOptions(&cuda));
  session_options.AppendExecutionProvider_CUDA_V2(*cuda);
  Ort::GetApi().ReleaseCUDAProviderOptions(cuda);
  return session_options;
}

std::vector<std::string> cache_names(int layers, const std::string& prefix) {
  std::vector<std::string> names;
  for (int layer = 0; layer < layers; ++layer)
    for (const char* part : {"key", "value"}) names.push_back(prefix + "." + std::to_string(layer) + "." + part);
  return names;
}

// A spec's name for an ONNX element type (package.py ONNX_DTYPES; others as ONNX Runtime writes them).
std::string element_type_name(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "tensor(int8)";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "tensor(uint8)";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: return "tensor(int16)";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return "tensor(uint16)";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32: return "tensor(uint32)";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64: return "tensor(uint64)";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "tensor(bfloat16)";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING: return "tensor(string)";
    default: return "tensor(type " + std::to_string(static_cast<int>(type)) + ")";
  }
}

GraphValue graph_value(const std::string& name, const Ort::TypeInfo& info) {
  GraphValue value{name, "", {}};
  if (info.GetONNXType() != ONNX_TYPE_TENSOR) {
    value.dtype = "not a tensor";
    return value;
  }
  const auto tensor = info.GetTensorTypeAndShapeInfo();
  value.dtype = element_type_name(tensor.GetElementType());
  value.shape = tensor.GetShape();  // -1 for a dynamic axis
  return value;
}

// (inputs, outputs) of a session, in its order, for check_graph_signature (model.py session_signature).
std::pair<std::vector<GraphValue>, std::vector<GraphValue>> session_signature(const Ort::Session& session) {
  Ort::AllocatorWithDefaultOptions allocator;
  std::vector<GraphValue> inputs, outputs;
  for (size_t k = 0; k < session.GetInputCount(); ++k)
    inputs.push_back(graph_value(session.GetInputNameAllocated(k, allocator).get(), session.GetInputTypeInfo(k)));
  for (size_t k = 0; k < session.GetOutputCount(); ++k)
    outputs.push_back(graph_value(session.GetOutputNameAllocated(k, allocator).get(), session.GetOutputTypeInfo(k)));
  return {inputs, outputs};
}

// decoder_states and head_tokens call the graphs of a split decoder, which a whole one does not have.
void require_split(const PackageManifest& manifest, const char* what) {
  if (manifest.decoder_layout != "split")
    throw Error(what + std::string(" needs a split decoder (package format 3), but ") + manifest.path +
                " describes a whole one; use decode, or export the package again with --decoder-layout split");
}

}  // namespace

Model::Impl::Impl(const std::string& package_dir, const ModelOptions& options)
    : path(package_dir),
      manifest(read_manifest(package_dir, options.verify)),
      tokenizer(package_dir + "/" + manifest.tokenizer_file, manifest.tokenizer_kind == "hf-bpe" ? manifest.pad_id : -1),
      cpu_memory(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)) {
  check_tokenizer(manifest, tokenizer.vocab_size());
  const Ort::SessionOptions settings = session_options(options);
  for (const std::string& name : manifest.graph_names) {
    const std::string graph_path = package_dir + "/" + manifest.graph_files.at(name);
    try {
      sessions.emplace(name, Ort::Session(ort_environment(), graph_path.c_str(), settings));
    } catch (const Ort::Exception& e) {
      throw Error(graph_path + " cannot be loaded by ONNX Runtime (" + e.what() + "); re-export the package");
    }
    const auto [inputs, outputs] = session_signature(sessions.at(name));
    check_graph_signature(manifest, name, inputs, outputs);
  }
  step_graph = &sessions.at(manifest.kind == "ar" ? "ar" : "backbone");
  past_names = cache_names(manifest.num_layers, "past_key_values");
  present_names = cache_names(manifest.num_layers, "present");
  first_output = manifest.kind == "ar" ? "logits" : "hidden";
}

std::vector<float> Model::Impl::sample_latents(const std::vector<float>& hidden, size_t rows,
                                               const std::vector<float>& noise, size_t samples) const {
  const int64_t hidden_shape[] = {static_cast<int64_t>(rows), manifest.hidden_size};
  const int64_t noise_shape[] = {static_cast<int64_t>(rows), static_cast<int64_t>(samples), manifest.noise_size};
  Ort::Value inputs[] = {
      Ort::Value::CreateTensor<float>(cpu_memory, const_cast<float*>(hidden.data()), hidden.size(), hidden_shape, 2),
      Ort::Value::CreateTensor<float>(cpu_memory, const_cast<float*>(noise.data()), noise.size(), noise_shape, 3)};
  const char* input_names[] = {"hidden", "noise"};
  const char* output_names[] = {"latents"};
  auto outputs = sessions.at("energy_head").Run(Ort::RunOptions{nullptr}, input_names, inputs, 2, output_names, 1);
  const float* latents = outputs[0].GetTensorData<float>();
  return std::vector<float>(latents, latents + rows * samples * manifest.latent_size);
}

TokenIds Model::Impl::decode(const std::vector<float>& latents, size_t rows) const {
  // Split: the head on every position of every row; its [rows * K] ids are the whole decoder's [rows, K].
  if (manifest.decoder_layout == "split") return head_tokens(decoder_states(latents, rows), rows * manifest.chunk_size);
  const int64_t shape[] = {static_cast<int64_t>(rows), manifest.latent_size};
  Ort::Value input =
      Ort::Value::CreateTensor<float>(cpu_memory, const_cast<float*>(latents.data()), latents.size(), shape, 2);
  const char* input_names[] = {"latents"};
  const char* output_names[] = {"token_ids"};
  auto outputs = sessions.at("decoder").Run(Ort::RunOptions{nullptr}, input_names, &input, 1, output_names, 1);
  const int64_t* ids = outputs[0].GetTensorData<int64_t>();
  return TokenIds(ids, ids + rows * manifest.chunk_size);
}

std::vector<float> Model::Impl::decoder_states(const std::vector<float>& latents, size_t rows) const {
  require_split(manifest, "decoder_states");
  const int64_t shape[] = {static_cast<int64_t>(rows), manifest.latent_size};
  Ort::Value input =
      Ort::Value::CreateTensor<float>(cpu_memory, const_cast<float*>(latents.data()), latents.size(), shape, 2);
  const char* input_names[] = {"latents"};
  const char* output_names[] = {"decoder_states"};
  auto outputs = sessions.at("decoder").Run(Ort::RunOptions{nullptr}, input_names, &input, 1, output_names, 1);
  const float* states = outputs[0].GetTensorData<float>();
  return std::vector<float>(states, states + rows * manifest.chunk_size * manifest.decoder_hidden_size);
}

TokenIds Model::Impl::head_tokens(const std::vector<float>& states, size_t rows) const {
  require_split(manifest, "head_tokens");
  const size_t width = manifest.decoder_hidden_size;
  // A lone row goes in twice: ONNX Runtime computes a one-row product with another kernel, whose
  // rounding can differ in the last bit (int4's MatMulNBits does), and a token must not depend on how
  // many rows travelled with it (runtime/model.py head_tokens does the same).
  std::vector<float> twice;
  if (rows == 1) {
    twice.assign(states.begin(), states.begin() + width);
    twice.insert(twice.end(), states.begin(), states.begin() + width);
  }
  const std::vector<float>& sent = rows == 1 ? twice : states;
  const size_t sent_rows = rows == 1 ? 2 : rows;
  const int64_t shape[] = {static_cast<int64_t>(sent_rows), static_cast<int64_t>(width)};
  Ort::Value input = Ort::Value::CreateTensor<float>(cpu_memory, const_cast<float*>(sent.data()),
                                                     sent_rows * width, shape, 2);
  const char* input_names[] = {"decoder_states"};
  const char* output_names[] = {"token_ids"};
  auto outputs = sessions.at("decoder_head").Run(Ort::RunOptions{nullptr}, input_names, &input, 1, output_names, 1);
  const int64_t* ids = outputs[0].GetTensorData<int64_t>();
  return TokenIds(ids, ids + rows);
}

Model::Model(const std::string& package_dir, const ModelOptions& options)
    : impl_(std::make_unique<Impl>(package_dir, options)) {}
Model::~Model() = default;
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;

std::vector<float> Model::Impl::hidden_states(const TokenIds& ids) const {
  const int64_t chunks = static_cast<int64_t>(ids.size()) / manifest.chunk_size;
  if (manifest.kind != "calm" || chunks < 1 || ids.size() % manifest.chunk_size)
    throw Error("hidden_states takes the token ids of whole chunks of a CALM package");
  TokenIds mask(chunks, 1), positions(chunks);
  for (int64_t c = 0; c < chunks; ++c) positions[c] = c;
  std::vector<Ort::Value> inputs;
  const int64_t ids_shape[] = {1, static_cast<int64_t>(ids.size())}, chunk_shape[] = {1, chunks};
  inputs.push_back(Ort::Value::CreateTensor<int64_t>(cpu_memory, const_cast<int64_t*>(ids.data()), ids.size(), ids_shape, 2));
  inputs.push_back(Ort::Value::CreateTensor<int64_t>(cpu_memory, mask.data(), mask.size(), chunk_shape, 2));
  inputs.push_back(Ort::Value::CreateTensor<int64_t>(cpu_memory, positions.data(), positions.size(), chunk_shape, 2));
  const int64_t past_shape[] = {1, manifest.num_kv_heads, 0, manifest.head_dim};
  float unused = 0;
  for (size_t k = 0; k < past_names.size(); ++k)
    inputs.push_back(Ort::Value::CreateTensor<float>(cpu_memory, &unused, 0, past_shape, 4));
  std::vector<const char*> input_names = {"input_ids", "attention_mask", "position_ids"};
  for (const std::string& name : past_names) input_names.push_back(name.c_str());
  const char* output_names[] = {"hidden"};
  auto outputs = step_graph->Run(Ort::RunOptions{nullptr}, input_names.data(), inputs.data(), inputs.size(),
                                 output_names, 1);
  const float* hidden = outputs[0].GetTensorData<float>();
  return std::vector<float>(hidden, hidden + chunks * manifest.hidden_size);
}

const std::string& Model::kind() const { return impl_->manifest.kind; }
int Model::chunk_size() const { return impl_->manifest.chunk_size; }
int Model::max_context() const { return impl_->manifest.max_context; }
int64_t Model::eos_id() const { return impl_->manifest.eos_id; }
int Model::noise_size() const { return impl_->manifest.noise_size; }
std::vector<float> Model::hidden_states(const TokenIds& ids) const { return impl_->hidden_states(ids); }
std::vector<float> Model::sample_latents(const std::vector<float>& hidden, size_t rows, const std::vector<float>& noise,
                                         size_t samples) const {
  return impl_->sample_latents(hidden, rows, noise, samples);
}
TokenIds Model::decode(const std::vector<float>& latents, size_t rows) const { return impl_->decode(latents, rows); }
std::vector<float> Model::decoder_states(const std::vector<float>& latents, size_t rows) const {
  return impl_->decoder_states(latents, rows);
}
TokenIds Model::head_tokens(const std::vector<float>& states, size_t rows) const {
  return impl_->head_tokens(states, rows);
}
const std::string& Model::decoder_layout() const { return impl_->manifest.decoder_layout; }
const Tokenizer& Model::tokenizer() const { return impl_->tokenizer; }

}  // namespace calm_edge
