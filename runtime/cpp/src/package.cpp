// Reads manifest.json (format versions 1 to 3) with the same checks, in the same order and with the
// same messages as runtime/package.py's Manifest.read (_check_schema, _check_file_entry, _check_confined,
// _check_files), so a broken or hostile package reads the same in Python and C++: one Error naming the
// manifest, the key and the fix. Values in messages are shown as Python's repr shows them (True, None, '1').
#include "package.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <tuple>
#include <vector>

#include "calm_edge.hpp"
#include "sha256.hpp"

namespace calm_edge {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;  // keys in the order written, as Python's dict keeps them

const char* kFormat = "calm-edge-package";
const char* kManifestFile = "manifest.json";
const std::vector<std::string> kPromptFills = {"left-eos", "right-pad"};          // calm_edge.config.PROMPT_FILLS
const std::vector<std::string> kTokenizerKinds = {"sentencepiece", "hf-bpe"};     // calm_edge.tokenizer.FILES
const std::vector<std::string> kDecoderLayouts = {"whole", "split"};              // package.py DECODER_LAYOUTS
// Quantization modes that scale activations over a whole call (one scale for every row): a row's token
// ids then depend on the rows sent with it, so the head must see every position at once (package.py
// ROW_DEPENDENT_MODES).
const std::vector<std::string> kRowDependentModes = {"int8-dynamic"};
constexpr int kMaxLinkHops = 40;  // as the kernel's ELOOP limit

// The graphs a package of `kind` holds (package.py GRAPHS, SPLIT_GRAPHS for a split CALM decoder).
std::vector<std::string> graphs_of_kind(const std::string& kind, bool split) {
  if (kind == "calm" && split) return {"backbone", "energy_head", "decoder", "decoder_head"};
  if (kind == "calm") return {"backbone", "energy_head", "decoder"};
  if (kind == "ar") return {"ar"};
  return {};
}

std::string join(const std::vector<std::string>& items, const std::string& separator = ", ") {
  std::string joined;
  for (const std::string& item : items) joined += (joined.empty() ? "" : separator) + item;
  return joined;
}

bool contains(const std::vector<std::string>& items, const std::string& item) {
  return std::find(items.begin(), items.end(), item) != items.end();
}

// A path as Python's pathlib prints it: no "." parts, no doubled or trailing separators.
std::string py_path(const fs::path& path) {
  fs::path shown;
  for (const auto& part : path)
    if (part != "." && !part.empty()) shown /= part;
  return shown.empty() ? "." : shown.string();
}

std::string py_string_repr(const std::string& text) {
  const bool has_single = text.find('\'') != std::string::npos, has_double = text.find('"') != std::string::npos;
  const char quote = has_single && !has_double ? '"' : '\'';
  std::string shown(1, quote);
  for (const unsigned char c : text) {
    if (c == '\\') shown += "\\\\";
    else if (c == quote) shown += std::string("\\") + static_cast<char>(c);
    else if (c == '\n') shown += "\\n";
    else if (c == '\r') shown += "\\r";
    else if (c == '\t') shown += "\\t";
    else if (c < 0x20 || c == 0x7f) {
      char escaped[5];
      std::snprintf(escaped, sizeof escaped, "\\x%02x", c);
      shown += escaped;
    } else {
      shown += static_cast<char>(c);
    }
  }
  return shown + quote;
}

// A JSON value as Python's repr() shows what json.loads made of it.
std::string py_repr(const json& value) {
  if (value.is_null()) return "None";
  if (value.is_boolean()) return value.get<bool>() ? "True" : "False";
  if (value.is_string()) return py_string_repr(value.get<std::string>());
  if (value.is_array()) {
    std::vector<std::string> items;
    for (const auto& item : value) items.push_back(py_repr(item));
    return "[" + join(items) + "]";
  }
  if (value.is_object()) {
    std::vector<std::string> items;
    for (const auto& [key, item] : value.items()) items.push_back(py_string_repr(key) + ": " + py_repr(item));
    return "{" + join(items) + "}";
  }
  return value.dump();  // numbers: 0, -5, 1.5, 1000000000.0
}

// Python's _is_int: a JSON whole number (true and false are not numbers here).
bool is_int(const json& value) { return value.is_number_integer(); }

// A whole number's value; one beyond int64 counts as the largest (it is out of every range anyway).
int64_t int_value(const json& value) {
  if (value.is_number_unsigned() && value.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) return INT64_MAX;
  return value.get<int64_t>();
}

// `object.get(key)`: the value, or null where the object lacks the key.
json get(const json& object, const std::string& key) {
  if (!object.is_object()) return json();
  const auto found = object.find(key);
  return found == object.end() ? json() : *found;
}

[[noreturn]] void fail(const std::string& path, const std::string& key, const std::string& problem) {
  throw Error(path + ": " + key + " " + problem + "; the manifest is damaged or was edited, export the package again");
}

// The characters of UTF-8 text, as Python's len() counts them.
size_t characters(const std::string& text) {
  return static_cast<size_t>(std::count_if(text.begin(), text.end(), [](char c) {
    return (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  }));
}

// A {"file", "sha256"} entry whose file is a plain name inside the package folder (_check_file_entry).
void check_file_entry(const json& entry, const std::string& key, const std::string& path) {
  const json file = get(entry, "file");
  if (!file.is_string() || file.get<std::string>().empty()) fail(path, key + ".file", "is " + py_repr(file) + ", not a file name");
  const std::string name = file.get<std::string>();
  bool escapes = name[0] == '/' || name[0] == '~' || name.find('\\') != std::string::npos;
  for (const auto& part : fs::path(name)) escapes = escapes || part == "..";
  if (escapes) fail(path, key + ".file", "is " + py_repr(file) + ", which leads outside the package folder");
  const json digest = get(entry, "sha256");
  if (!digest.is_string() || characters(digest.get<std::string>()) != 64)
    fail(path, key + ".sha256", "is " + py_repr(digest) + ", not a sha256");
}

// The schema: every key a runtime relies on is present, of its type and in range (_check_schema).
void check_schema(const json& data, const std::string& path) {
  if (!data.is_object() || get(data, "format") != kFormat)
    throw Error(path + " is not a calm-edge package manifest; export the package again");
  const json version = get(data, "format_version");
  if (!is_int(version) || int_value(version) < 1)
    fail(path, "format_version",
         "is " + py_repr(version) + ", not a format version (1 to " + std::to_string(kPackageFormatVersion) + ")");
  if (int_value(version) > kPackageFormatVersion)
    throw Error(path + " has package format version " + version.dump() + ", newer than this calm-edge reads (" +
                std::to_string(kPackageFormatVersion) +
                "); upgrade calm-edge (pip install -U calm-edge) or export the package with this version");
  const json kind = get(data, "kind");
  const json graphs = get(data, "graphs");
  const json model = get(data, "model");
  const std::string kind_name = kind.is_string() ? kind.get<std::string>() : "";
  // The layout decides which graphs to expect, so it is read before the model section is checked.
  const json layout = model.is_object() && model.contains("decoder_layout") ? model["decoder_layout"] : json("whole");
  const bool split = layout == "split";
  std::vector<std::string> listed;
  if (graphs.is_object())
    for (const auto& item : graphs.items()) listed.push_back(item.key());
  std::sort(listed.begin(), listed.end());
  std::vector<std::string> wanted = graphs_of_kind(kind_name, split);
  std::sort(wanted.begin(), wanted.end());
  if (wanted.empty() || !graphs.is_object() || listed != wanted) {
    std::vector<std::string> shown;
    for (const std::string& name : listed) shown.push_back(py_string_repr(name));
    throw Error(path + " lists graphs " + (graphs.is_object() ? "[" + join(shown) + "]" : py_repr(graphs)) +
                " for kind " + py_repr(kind) + "; export the package again");
  }

  if (!model.is_object()) fail(path, "model", "is missing or not an object");
  if (!layout.is_string() || !contains(kDecoderLayouts, layout.get<std::string>()) || (split && kind_name != "calm"))
    fail(path, "model.decoder_layout",
         "is " + py_repr(layout) + ", not one of " + join(kDecoderLayouts) + " (split: CALM only)");
  if (split && int_value(version) < 3)
    fail(path, "format_version",
         "is " + version.dump() + ", but a split decoder (model.decoder_layout) needs version 3");
  std::vector<std::string> positive = {"chunk_size", "vocab_size", "hidden_size", "num_layers",
                                       "num_heads",  "num_kv_heads", "head_dim",  "max_context"};
  if (kind_name == "calm") positive.insert(positive.end(), {"latent_size", "noise_size"});
  if (split) positive.push_back("decoder_hidden_size");
  for (const std::string& key : positive) {
    const json value = get(model, key);
    if (!is_int(value) || int_value(value) < 1)
      fail(path, "model." + key, "is " + py_repr(value) + ", not a positive whole number");
  }
  for (const std::string& key : positive)
    if (key != "max_context" && int_value(model[key]) > kMaxDimension)
      fail(path, "model." + key, "is " + model[key].dump() + ", beyond the " + std::to_string(kMaxDimension) +
                                     " calm-edge allows for any dimension");
  if (kind_name == "ar" && int_value(model["chunk_size"]) != 1)
    fail(path, "model.chunk_size",
         "is " + model["chunk_size"].dump() + ", but an AR package generates one token per step (1)");
  if (int_value(model["max_context"]) > kMaxContext)
    fail(path, "model.max_context", "is " + model["max_context"].dump() + ", beyond the " +
                                        std::to_string(kMaxContext) + " positions calm-edge allocates");
  if (int_value(model["num_heads"]) % int_value(model["num_kv_heads"]))
    fail(path, "model.num_kv_heads",
         "(" + model["num_kv_heads"].dump() + ") does not divide num_heads (" + model["num_heads"].dump() + ")");
  const json special = get(model, "special_ids");
  if (!special.is_object() || !is_int(get(special, "eos")) || !is_int(get(special, "pad")))
    fail(path, "model.special_ids", "must give whole-number eos and pad ids");
  const int64_t vocab_size = int_value(model["vocab_size"]);
  for (const auto& [key, value] : special.items())
    if (is_int(value) && !(value.is_number_unsigned() ? value.get<uint64_t>() < static_cast<uint64_t>(vocab_size)
                                                      : (value.get<int64_t>() >= 0 && value.get<int64_t>() < vocab_size)))
      fail(path, "model.special_ids." + key,
           "is " + value.dump() + ", outside the vocabulary of " + std::to_string(vocab_size));

  const json prompt_fill = model.contains("prompt_fill") ? model["prompt_fill"] : json("left-eos");
  if (!prompt_fill.is_string() || !contains(kPromptFills, prompt_fill.get<std::string>()))
    fail(path, "model.prompt_fill", "is " + py_repr(get(model, "prompt_fill")) + ", not one of " + join(kPromptFills));
  const json tokenizer = get(data, "tokenizer");
  if (!tokenizer.is_object()) fail(path, "tokenizer", "is missing or not an object");
  check_file_entry(tokenizer, "tokenizer", path);
  const json tokenizer_kind = tokenizer.contains("kind") ? tokenizer["kind"] : json("sentencepiece");
  if (!tokenizer_kind.is_string() || !contains(kTokenizerKinds, tokenizer_kind.get<std::string>()))
    fail(path, "tokenizer.kind", "is " + py_repr(tokenizer_kind) + ", not one of " + join(kTokenizerKinds));
  if (tokenizer.contains("add_bos") && !tokenizer["add_bos"].is_boolean())
    fail(path, "tokenizer.add_bos", "is " + py_repr(tokenizer["add_bos"]) + ", not true or false");
  bool uses_version_2 = model.contains("prompt_fill");
  for (const auto& item : tokenizer.items())
    uses_version_2 = uses_version_2 || (item.key() != "file" && item.key() != "sha256");
  if (int_value(version) < 2 && uses_version_2)
    fail(path, "format_version", "is 1, but the manifest uses version 2's tokenizer kind or prompt fill");
  for (const auto& [name, graph] : graphs.items()) {
    const std::string key = "graphs." + name;
    if (!graph.is_object()) fail(path, key, "is not an object");
    check_file_entry(graph, key, path);
    const json bytes = get(graph, "bytes");
    if (!is_int(bytes) || int_value(bytes) < 0) fail(path, key + ".bytes", "is " + py_repr(bytes) + ", not a size in bytes");
    for (const char* side : {"inputs", "outputs"}) {
      const json entries = get(graph, side);
      bool listed_ok = entries.is_array();
      if (listed_ok)
        for (const auto& entry : entries) listed_ok = listed_ok && entry.is_object() && get(entry, "name").is_string();
      if (!listed_ok) fail(path, key + "." + side, "must be a list of {name, dtype, shape}");
    }
    if (graph.contains("external_data")) {
      if (!graph["external_data"].is_object()) fail(path, key + ".external_data", "is not an object");
      check_file_entry(graph["external_data"], key + ".external_data", path);
    }
  }
  const json quantization = get(data, "quantization");
  if (!quantization.is_object() || !get(quantization, "mode").is_string())
    fail(path, "quantization.mode", "is missing or not a string");
  for (const char* key : {"provenance", "validation"})
    if (!get(data, key).is_null() && !get(data, key).is_object()) fail(path, key, "is not an object");
}

// `path` (absolute) with every symbolic link followed, a dangling one too, as Python's Path.resolve() does;
// false on a loop of links.
bool resolve_links(const fs::path& path, fs::path& resolved) {
  std::deque<fs::path> parts(path.begin(), path.end());
  fs::path current = path.root_path();
  int hops = 0;
  while (!parts.empty()) {
    const fs::path part = parts.front();
    parts.pop_front();
    if (part.empty() || part == "." || part == path.root_path() || part == "/") continue;
    if (part == "..") {
      current = current.parent_path();
      continue;
    }
    const fs::path next = current / part;
    std::error_code error;
    if (!fs::is_symlink(fs::symlink_status(next, error))) {
      current = next;
      continue;
    }
    if (++hops > kMaxLinkHops) return false;
    const fs::path target = fs::read_symlink(next, error);
    if (error) return false;
    if (target.is_absolute()) current = target.root_path();
    std::vector<fs::path> target_parts(target.begin(), target.end());
    parts.insert(parts.begin(), target_parts.begin(), target_parts.end());
  }
  resolved = current;
  return true;
}

bool is_inside(const fs::path& path, const fs::path& folder) {
  auto p = path.begin();
  for (auto f = folder.begin(); f != folder.end(); ++f, ++p) {
    if (f->empty()) continue;  // a trailing separator
    if (p == path.end() || *p != *f) return false;
  }
  return true;
}

// `folder / file` must lie inside `folder` once every symbolic link is followed (_check_confined).
void check_confined(const fs::path& folder, const std::string& path, const std::string& key, const std::string& file,
                    const std::string& what) {
  fs::path resolved, root;
  const bool followed = resolve_links(fs::absolute(folder / file), resolved);
  if (!followed || !resolve_links(fs::absolute(folder), root))
    throw Error(path + ": " + key + " is " + py_string_repr(file) + " (" + what +
                "), a symbolic link that cannot be followed (a loop); a package must hold its own files: export the "
                "package again");
  if (!is_inside(resolved, root))
    throw Error(path + ": " + key + " is " + py_string_repr(file) + " (" + what +
                "), which leads outside the package folder through a symbolic link; a package must hold its own "
                "files: export the package again");
}

json parse_manifest(const fs::path& dir, const std::string& path) {
  if (!fs::is_directory(dir))
    throw Error("model package " + py_path(dir) + " does not exist; create one with `calm-edge export`");
  check_confined(dir, path, kManifestFile, kManifestFile, "the manifest");
  const fs::path file_path = dir / kManifestFile;
  std::error_code error;
  if (!fs::exists(file_path, error))
    throw Error(path + " not found: " + py_path(dir) +
                " is not a calm-edge model package; export one with `calm-edge export`");
  if (fs::is_directory(file_path, error)) throw Error("cannot read " + path + ": Is a directory; check the package folder");
  std::ifstream file(file_path);
  if (!file) throw Error("cannot read " + path + ": Permission denied; check the package folder");
  try {
    return json::parse(file);
  } catch (const json::exception& e) {
    throw Error(path + " is corrupt (" + e.what() + "); export the package again");
  }
}

// Every file the package must hold: (key, file name, expected sha256, what it is), as Manifest._files.
std::vector<std::tuple<std::string, std::string, std::string, std::string>> listed_files(const json& manifest) {
  std::vector<std::tuple<std::string, std::string, std::string, std::string>> files;
  files.emplace_back("tokenizer.file", manifest["tokenizer"]["file"], manifest["tokenizer"]["sha256"], "tokenizer");
  for (const auto& [name, graph] : manifest["graphs"].items()) {
    files.emplace_back("graphs." + name + ".file", graph["file"], graph["sha256"], name + " graph");
    if (graph.contains("external_data"))
      files.emplace_back("graphs." + name + ".external_data.file", graph["external_data"]["file"],
                         graph["external_data"]["sha256"], name + " graph's data");
  }
  return files;
}

// Confinement of every file before any is opened, then each one's presence and sha256 (_check_files).
void check_files(const json& manifest, const fs::path& dir, const std::string& path, bool verify) {
  const auto files = listed_files(manifest);
  for (const auto& [key, file, expected, what] : files) check_confined(dir, path, key, file, what);
  for (const auto& [key, file, expected, what] : files) {
    const fs::path file_path = dir / file;
    if (!fs::is_regular_file(file_path))
      throw Error(py_path(file_path) + " (" + what + ") is missing from the package; copy the whole package folder again");
    if (verify && sha256_of_file(file_path.string()) != expected)
      throw Error(py_path(file_path) + " (" + what + ") does not match the sha256 in " + path +
                  ": the file is corrupt or was replaced; copy the package again or re-export it");
  }
}

// The quantization mode of graph decoder_head: quantization.graphs.decoder_head, "fp32" where the head was
// left as exported (package.py Manifest.graph_modes); "" for a value that names no mode.
std::string head_mode(const json& quantization) {
  const json graphs = get(quantization, "graphs");
  if (!graphs.is_object() || !graphs.contains("decoder_head")) return "fp32";
  return graphs["decoder_head"].is_string() ? graphs["decoder_head"].get<std::string>() : "";
}

PackageManifest model_section(const json& manifest, const fs::path& dir, const std::string& path) {
  const json& model = manifest["model"];
  PackageManifest result;
  result.folder = dir.string();
  result.path = path;
  result.kind = manifest["kind"];
  // Every size was checked to be a whole number in [1, kMaxDimension]: it fits an int.
  // latent_size and noise_size are read (and checked) for CALM only, as in Python.
  auto size = [&](const char* key) {
    return static_cast<int>(model.contains(key) && is_int(model[key]) ? int_value(model[key]) : 0);
  };
  result.chunk_size = size("chunk_size");
  result.vocab_size = size("vocab_size");
  result.eos_id = int_value(model["special_ids"]["eos"]);
  result.pad_id = int_value(model["special_ids"]["pad"]);
  result.hidden_size = size("hidden_size");
  result.num_layers = size("num_layers");
  result.num_heads = size("num_heads");
  result.num_kv_heads = size("num_kv_heads");
  result.head_dim = size("head_dim");
  result.max_context = size("max_context");
  if (result.kind == "calm") {
    result.latent_size = size("latent_size");
    result.noise_size = size("noise_size");
  }
  result.prompt_fill = model.value("prompt_fill", "left-eos");
  result.decoder_layout = model.value("decoder_layout", "whole");
  if (result.decoder_layout == "split") {
    result.decoder_hidden_size = size("decoder_hidden_size");
    result.decoder_head_rows_independent = !contains(kRowDependentModes, head_mode(manifest["quantization"]));
  }
  result.tokenizer_file = manifest["tokenizer"]["file"];
  result.tokenizer_kind = manifest["tokenizer"].value("kind", "sentencepiece");
  for (const auto& [name, graph] : manifest["graphs"].items()) {
    result.graph_files[name] = graph["file"];
    result.graph_names.push_back(name);
  }
  return result;
}

// ----- the graphs' signatures (package.py graph_specs and signature_problem) ---------------------------

constexpr int64_t kDynamic = -1;

std::vector<std::string> cache_names(int layers, const std::string& prefix) {
  std::vector<std::string> names;
  for (int layer = 0; layer < layers; ++layer)
    for (const char* part : {"key", "value"}) names.push_back(prefix + "." + std::to_string(layer) + "." + part);
  return names;
}

struct GraphSpec {
  std::vector<GraphValue> inputs, outputs;
};

GraphSpec graph_spec(const PackageManifest& m, const std::string& name) {
  const int64_t kv = m.num_kv_heads, head_dim = m.head_dim;
  std::vector<GraphValue> step_inputs = {{"input_ids", "int64", {kDynamic, kDynamic}},
                                         {"attention_mask", "int64", {kDynamic, kDynamic}},
                                         {"position_ids", "int64", {kDynamic, kDynamic}}};
  for (const std::string& past : cache_names(m.num_layers, "past_key_values"))
    step_inputs.push_back({past, "float32", {kDynamic, kv, kDynamic, head_dim}});
  std::vector<GraphValue> present;
  for (const std::string& name_ : cache_names(m.num_layers, "present"))
    present.push_back({name_, "float32", {kDynamic, kv, kDynamic, head_dim}});
  GraphSpec spec;
  if (name == "ar" || name == "backbone") {
    spec.inputs = step_inputs;
    if (name == "ar") spec.outputs.push_back({"logits", "float32", {kDynamic, m.vocab_size}});
    else spec.outputs.push_back({"hidden", "float32", {kDynamic, kDynamic, m.hidden_size}});
    spec.outputs.insert(spec.outputs.end(), present.begin(), present.end());
  } else if (name == "energy_head") {
    spec.inputs = {{"hidden", "float32", {kDynamic, m.hidden_size}}, {"noise", "float32", {kDynamic, kDynamic, m.noise_size}}};
    spec.outputs = {{"latents", "float32", {kDynamic, kDynamic, m.latent_size}}};
  } else if (name == "decoder") {
    spec.inputs = {{"latents", "float32", {kDynamic, m.latent_size}}};
    if (m.decoder_layout == "split")
      spec.outputs = {{"decoder_states", "float32", {kDynamic, m.chunk_size, m.decoder_hidden_size}}};
    else
      spec.outputs = {{"token_ids", "int64", {kDynamic, m.chunk_size}}};
  } else if (name == "decoder_head") {
    spec.inputs = {{"decoder_states", "float32", {kDynamic, m.decoder_hidden_size}}};
    spec.outputs = {{"token_ids", "int64", {kDynamic}}};
  }
  return spec;
}

// What is wrong with one side of a graph's signature, or "" (signature_problem, the same words).
std::string signature_problem(const std::vector<GraphValue>& expected, const std::vector<GraphValue>& have) {
  auto find = [](const std::vector<GraphValue>& values, const std::string& name) -> const GraphValue* {
    for (const GraphValue& value : values)
      if (value.name == name) return &value;
    return nullptr;
  };
  std::vector<std::string> missing, extra;
  for (const GraphValue& want : expected)
    if (!find(have, want.name)) missing.push_back(want.name);
  for (const GraphValue& got : have)
    if (!find(expected, got.name)) extra.push_back(got.name);
  if (!missing.empty() || !extra.empty())
    return "the graph has " + (extra.empty() ? "none" : join(extra)) + " where the manifest expects " +
           (missing.empty() ? "none" : join(missing));
  for (const GraphValue& got : have) {
    const GraphValue& spec = *find(expected, got.name);
    // A float32 spec accepts a float16 graph: an fp16 package may keep an fp16 cache.
    const bool compatible = got.dtype == spec.dtype || (spec.dtype == "float32" && got.dtype == "float16");
    if (!compatible) return got.name + " has element type " + got.dtype + ", but the manifest says " + spec.dtype;
    if (got.shape.size() != spec.shape.size())
      return got.name + " has " + std::to_string(got.shape.size()) + " dimensions, but the manifest says " +
             std::to_string(spec.shape.size());
    for (size_t axis = 0; axis < got.shape.size(); ++axis)
      if (got.shape[axis] >= 0 && spec.shape[axis] >= 0 && got.shape[axis] != spec.shape[axis])
        return got.name + " has " + std::to_string(got.shape[axis]) + " at dimension " + std::to_string(axis) +
               ", but the manifest's model section gives " + std::to_string(spec.shape[axis]);
  }
  return "";
}

}  // namespace

PackageManifest read_manifest(const std::string& dir_name, bool verify) {
  const fs::path dir(dir_name);
  const std::string path = py_path(dir / kManifestFile);
  const json manifest = parse_manifest(dir, path);
  check_schema(manifest, path);
  check_files(manifest, dir, path, verify);
  return model_section(manifest, dir, path);
}

void check_graph_signature(const PackageManifest& manifest, const std::string& name,
                           const std::vector<GraphValue>& inputs, const std::vector<GraphValue>& outputs) {
  const GraphSpec spec = graph_spec(manifest, name);
  const std::string graph_path = py_path(fs::path(manifest.folder) / manifest.graph_files.at(name));
  for (const auto& [side, expected, have] : {std::make_tuple("inputs", &spec.inputs, &inputs),
                                             std::make_tuple("outputs", &spec.outputs, &outputs)}) {
    const std::string problem = signature_problem(*expected, *have);
    if (!problem.empty())
      throw Error(graph_path + ": graphs." + name + " " + side + ": " + problem +
                  "; the graph does not belong to this manifest (files swapped between roles, or the model section "
                  "edited): export the package again");
  }
}

void check_tokenizer(const PackageManifest& manifest, int64_t tokenizer_vocab_size) {
  const bool too_big = tokenizer_vocab_size > manifest.vocab_size;
  if (too_big || (manifest.tokenizer_kind == "sentencepiece" && tokenizer_vocab_size != manifest.vocab_size))
    throw Error(manifest.path + ": model.vocab_size is " + std::to_string(manifest.vocab_size) +
                ", but the tokenizer " + manifest.tokenizer_file + " has " + std::to_string(tokenizer_vocab_size) +
                " pieces; the tokenizer does not belong to this model: export the package again with its own "
                "tokenizer");
}

}  // namespace calm_edge
