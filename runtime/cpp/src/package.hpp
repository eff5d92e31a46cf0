// The model package, format versions 1 and 2 (runtime/package.py is the reference): reading and checking
// manifest.json, the presence and sha256 of every file it lists (each inside the package folder), and the
// model's sizes.
#pragma once

#include <cstdint>
#include <map>
#include <string>

namespace calm_edge {

constexpr int kPackageFormatVersion = 2;  // the newest version this runtime reads

// The manifest's "model" section and the file of each graph: what a runtime needs to size its inputs.
struct PackageManifest {
  std::string kind;  // "calm" or "ar"
  int chunk_size = 1;
  int vocab_size = 0;
  int64_t eos_id = 0;
  int64_t pad_id = 0;
  int hidden_size = 0;
  int num_layers = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int max_context = 0;
  int latent_size = 0;  // CALM only
  int noise_size = 0;   // CALM only
  std::string prompt_fill = "left-eos";  // or "right-pad" (version 2: the released CALM models)
  std::string tokenizer_file;
  std::string tokenizer_kind = "sentencepiece";  // or "hf-bpe" (version 2)
  std::map<std::string, std::string> graph_files;  // graph name -> file name inside the package
};

// The checked manifest of the package in folder `dir`; throws Error naming the file and the fix.
PackageManifest read_manifest(const std::string& dir, bool verify);

}  // namespace calm_edge
