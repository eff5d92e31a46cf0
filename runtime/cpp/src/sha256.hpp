// sha256 of a file, for the package's integrity checks.
#pragma once

#include <string>

namespace calm_edge {

// Lower-case hex digest of the file at `path`, like calm_edge.fileio.sha256_of; throws Error if unreadable.
std::string sha256_of_file(const std::string& path);

}  // namespace calm_edge
