// The model package, format versions 1 to 3 (runtime/package.py is the reference): reading and checking
// manifest.json (its schema, key by key), the presence and sha256 of every file it lists (each inside the
// package folder, symbolic links followed), the model's sizes, and what the opened graphs and tokenizer must
// agree with. Every problem is one Error worded as the Python runtime words it.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace calm_edge {

constexpr int kPackageFormatVersion = 3;  // the newest version this runtime reads (package.py LATEST_VERSION)
constexpr int64_t kMaxContext = int64_t{1} << 20;    // positions a manifest may ask for (package.py MAX_CONTEXT)
constexpr int64_t kMaxDimension = int64_t{1} << 24;  // any other size of the model section (MAX_DIMENSION)

// The manifest's "model" section and the file of each graph: what a runtime needs to size its inputs.
struct PackageManifest {
  std::string folder;  // the package folder as given
  std::string path;    // its manifest.json, as messages name it
  std::string kind;    // "calm" or "ar"
  int chunk_size = 1;
  int vocab_size = 0;
  int64_t eos_id = 0;
  int64_t pad_id = 0;
  int hidden_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int max_context = 0;
  int latent_size = 0;  // CALM only
  int noise_size = 0;   // CALM only
  std::string prompt_fill = "left-eos";  // or "right-pad" (version 2: the released CALM models)
  // "whole": decoder.onnx gives token ids; "split" (version 3, CALM only): decoder.onnx gives the decoder's
  // last states [rows, K, decoder_hidden_size] and decoder_head.onnx maps any rows of them to token ids.
  std::string decoder_layout = "whole";
  int decoder_hidden_size = 0;  // split only
  // Whether the head's token id for a row depends on that row alone, so that a runtime may send it only
  // the positions a step needs (package.py Manifest.decoder_head_rows_independent): a split head not
  // quantized with activations scaled over a whole call (package.py ROW_DEPENDENT_MODES).
  bool decoder_head_rows_independent = false;
  std::string tokenizer_file;
  std::string tokenizer_kind = "sentencepiece";  // or "hf-bpe" (version 2)
  std::map<std::string, std::string> graph_files;  // graph name -> file name inside the package
  std::vector<std::string> graph_names;            // in the manifest's order, the order sessions are opened in
};

// The checked manifest of the package in folder `dir`; throws Error naming the file or key and the fix.
PackageManifest read_manifest(const std::string& dir, bool verify);

// One input or output of a graph as its session reports it: dtype as a spec writes it ("float32", "int64",
// ...) and -1 for a dynamic axis.
struct GraphValue {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
};

// The `name` graph's session must take and give what the manifest's model section says (package.py
// Manifest.check_graph_signature): names, element types, ranks and fixed dimensions. Throws Error.
void check_graph_signature(const PackageManifest& manifest, const std::string& name,
                           const std::vector<GraphValue>& inputs, const std::vector<GraphValue>& outputs);

// The tokenizer's vocabulary must be the model's (package.py Manifest.check_tokenizer). Throws Error.
void check_tokenizer(const PackageManifest& manifest, int64_t tokenizer_vocab_size);

}  // namespace calm_edge
