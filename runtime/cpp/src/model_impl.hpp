// Inside calm_edge::Model: the package's manifest, its tokenizer and one ONNX Runtime session per
// graph. The generation loop (generator.cpp) and the step state (step_state.cpp) use it directly.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <map>
#include <string>
#include <vector>

#include "calm_edge.hpp"
#include "package.hpp"

namespace calm_edge {

struct Model::Impl {
  Impl(const std::string& package_dir, const ModelOptions& options);

  // The energy head: hidden [rows, hidden], noise [rows, samples, noise_size] -> latents [rows, samples, latent].
  std::vector<float> sample_latents(const std::vector<float>& hidden, size_t rows,
                                    const std::vector<float>& noise, size_t samples) const;
  // The decoder, whatever its layout: latents [rows, latent] -> token ids [rows, K].
  TokenIds decode(const std::vector<float>& latents, size_t rows) const;
  // A split decoder's two graphs (runtime/model.py decoder_states, head_tokens): latents [rows, latent] ->
  // the decoder's last states [rows, K, decoder_hidden]; states [rows, decoder_hidden] -> token ids [rows].
  std::vector<float> decoder_states(const std::vector<float>& latents, size_t rows) const;
  TokenIds head_tokens(const std::vector<float>& states, size_t rows) const;
  // The backbone over one sequence from an empty cache: every chunk's hidden state [S, hidden].
  std::vector<float> hidden_states(const TokenIds& ids) const;

  std::string path;
  PackageManifest manifest;
  Tokenizer tokenizer;
  Ort::MemoryInfo cpu_memory;
  // Session::Run is safe to call from several threads but not declared const in the C++ API.
  mutable std::map<std::string, Ort::Session> sessions;
  Ort::Session* step_graph = nullptr;  // "backbone" (CALM) or "ar"
  // Names of the step graph's cache inputs and outputs, layer by layer, key then value.
  std::vector<std::string> past_names, present_names;
  std::string first_output;  // "hidden" (CALM) or "logits" (AR)
};

}  // namespace calm_edge
