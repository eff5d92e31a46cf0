// Reads manifest.json with the same checks, in the same order and with the same messages as
// runtime/package.py's read_manifest, so a broken package reads the same in Python and C++.
#include "package.hpp"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <set>
#include <tuple>
#include <vector>

#include "calm_edge.hpp"
#include "sha256.hpp"

namespace calm_edge {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const char* kFormat = "calm-edge-package";

std::set<std::string> graphs_of_kind(const std::string& kind) {
  if (kind == "calm") return {"backbone", "energy_head", "decoder"};
  return {"ar"};
}

json parse_manifest(const fs::path& dir, const fs::path& path) {
  if (!fs::is_directory(dir))
    throw Error("model package " + dir.string() + " does not exist; create one with `calm-edge export`");
  std::ifstream file(path);
  if (!file)
    throw Error(path.string() + " not found: " + dir.string() +
                " is not a calm-edge model package; export one with `calm-edge export`");
  try {
    return json::parse(file);
  } catch (const json::exception& e) {
    throw Error(path.string() + " is corrupt (" + e.what() + "); export the package again");
  }
}

void check_format(const json& manifest, const fs::path& path) {
  if (!manifest.is_object() || manifest.value("format", "") != kFormat)
    throw Error(path.string() + " is not a calm-edge package manifest; export the package again");
  const json version = manifest.value("format_version", json());
  if (!version.is_number_integer() || version.get<int>() < 1 || version.get<int>() > kPackageFormatVersion)
    throw Error(path.string() + " has package format version " + version.dump() +
                ", newer than this calm-edge reads (" + std::to_string(kPackageFormatVersion) +
                "); upgrade calm-edge or export the package with this version");
  const std::string kind = manifest.value("kind", "");
  std::set<std::string> listed;
  for (const auto& item : manifest.value("graphs", json::object()).items()) listed.insert(item.key());
  if ((kind != "calm" && kind != "ar") || listed != graphs_of_kind(kind)) {
    std::string names;
    for (const auto& name : listed) names += (names.empty() ? "" : ", ") + name;
    throw Error(path.string() + " lists graphs [" + names + "] for kind '" + kind + "'; export the package again");
  }
}

// Every file the package must hold: (file name, expected sha256, what it is).
std::vector<std::tuple<std::string, std::string, std::string>> listed_files(const json& manifest) {
  std::vector<std::tuple<std::string, std::string, std::string>> files;
  files.emplace_back(manifest.at("tokenizer").at("file"), manifest.at("tokenizer").at("sha256"), "tokenizer");
  for (const auto& [name, graph] : manifest.at("graphs").items()) {
    files.emplace_back(graph.at("file"), graph.at("sha256"), name + " graph");
    if (graph.contains("external_data"))
      files.emplace_back(graph["external_data"].at("file"), graph["external_data"].at("sha256"),
                         name + " graph's data");
  }
  return files;
}

// A name the manifest gives must be a plain path inside the package: nothing absolute, no "..", and no
// symbolic link that leads out of the folder.
void check_confined(const std::string& file, const fs::path& dir, const fs::path& path, const std::string& what) {
  const fs::path name(file);
  bool escapes = file.empty() || name.is_absolute() || file.find('\\') != std::string::npos || file[0] == '~';
  for (const auto& part : name) escapes = escapes || part == "..";
  std::error_code error;
  const fs::path resolved = fs::weakly_canonical(dir / name, error), root = fs::weakly_canonical(dir, error);
  if (!escapes && fs::exists(dir / name)) {
    const auto relative = resolved.lexically_relative(root);
    escapes = relative.empty() || *relative.begin() == "..";
  }
  if (escapes)
    throw Error(path.string() + " names '" + file + "' (" + what +
                "), which leads outside the package folder; a package must hold its own files: export the package again");
}

void check_files(const json& manifest, const fs::path& dir, const fs::path& path, bool verify) {
  for (const auto& [file, expected, what] : listed_files(manifest)) {
    check_confined(file, dir, path, what);
    const fs::path file_path = dir / file;
    if (!fs::is_regular_file(file_path))
      throw Error(file_path.string() + " (" + what +
                  ") is missing from the package; copy the whole package folder again");
    if (verify && sha256_of_file(file_path.string()) != expected)
      throw Error(file_path.string() + " (" + what + ") does not match the sha256 in " + path.string() +
                  ": the file is corrupt or was replaced; copy the package again or re-export it");
  }
}

PackageManifest model_section(const json& manifest) {
  const json& model = manifest.at("model");
  PackageManifest result;
  result.kind = manifest.at("kind");
  result.chunk_size = model.at("chunk_size");
  result.vocab_size = model.at("vocab_size");
  result.eos_id = model.at("special_ids").at("eos");
  result.pad_id = model.at("special_ids").at("pad");
  result.hidden_size = model.at("hidden_size");
  result.num_layers = model.at("num_layers");
  result.num_kv_heads = model.at("num_kv_heads");
  result.head_dim = model.at("head_dim");
  result.max_context = model.at("max_context");
  result.latent_size = model.value("latent_size", 0);
  result.noise_size = model.value("noise_size", 0);
  result.prompt_fill = model.value("prompt_fill", "left-eos");
  result.tokenizer_file = manifest.at("tokenizer").at("file");
  result.tokenizer_kind = manifest.at("tokenizer").value("kind", "sentencepiece");
  if (result.prompt_fill != "left-eos" && result.prompt_fill != "right-pad")
    throw Error("model.prompt_fill '" + result.prompt_fill + "' is neither left-eos nor right-pad");
  if (result.tokenizer_kind != "sentencepiece" && result.tokenizer_kind != "hf-bpe")
    throw Error("tokenizer.kind '" + result.tokenizer_kind + "' is neither sentencepiece nor hf-bpe");
  for (const auto& [name, graph] : manifest.at("graphs").items()) result.graph_files[name] = graph.at("file");
  return result;
}

}  // namespace

PackageManifest read_manifest(const std::string& dir_name, bool verify) {
  const fs::path dir(dir_name);
  const fs::path path = dir / "manifest.json";
  const json manifest = parse_manifest(dir, path);
  check_format(manifest, path);
  try {
    check_files(manifest, dir, path, verify);
    return model_section(manifest);
  } catch (const json::exception& e) {
    // A field missing or of the wrong type: the manifest was edited or written by something else.
    throw Error(path.string() + " lacks a field or has one of the wrong type (" + e.what() +
                "); export the package again");
  }
}

}  // namespace calm_edge
