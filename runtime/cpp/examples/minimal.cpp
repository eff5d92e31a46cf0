// The README's minimal example: load a package, stream 64 tokens of a continuation.
#include <calm_edge.hpp>

#include <iostream>

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: minimal PKG PROMPT\n";
    return 2;
  }
  try {
    calm_edge::Model model(argv[1]);
    calm_edge::GeneratorParams params;
    params.max_new_tokens = 64;
    params.temperature = 0.5;
    params.seed = 1;
    calm_edge::generate(model, argv[2], params, [](const std::string& piece) { std::cout << piece << std::flush; });
    std::cout << "\n";
  } catch (const calm_edge::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
