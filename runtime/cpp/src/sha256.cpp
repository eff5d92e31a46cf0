// sha256 through OpenSSL's libcrypto (EVP interface), read in 1 MiB blocks so large graphs never
// sit in memory twice.
#include "sha256.hpp"

#include <openssl/evp.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <vector>

#include "calm_edge.hpp"

namespace calm_edge {

std::string sha256_of_file(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw Error(path + " cannot be read; check that it exists and is readable");

  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> context(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!context || EVP_DigestInit_ex(context.get(), EVP_sha256(), nullptr) != 1)
    throw Error("OpenSSL could not start a sha256 digest (while checking " + path + ")");

  std::vector<char> block(1 << 20);
  while (file) {
    file.read(block.data(), static_cast<std::streamsize>(block.size()));
    if (file.gcount() > 0) EVP_DigestUpdate(context.get(), block.data(), static_cast<size_t>(file.gcount()));
  }
  if (file.bad()) throw Error(path + " could not be read to the end; copy the package again");

  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_DigestFinal_ex(context.get(), digest, &length);
  std::string hex;
  char byte_hex[3];
  for (unsigned int k = 0; k < length; ++k) {
    std::snprintf(byte_hex, sizeof byte_hex, "%02x", digest[k]);
    hex += byte_hex;
  }
  return hex;
}

}  // namespace calm_edge
