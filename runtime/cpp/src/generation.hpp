// The rules of generation that calm_edge::Generator (generator.cpp) and calm_edge::Engine (engine.cpp)
// share, one copy for both, as runtime/generator.py's helpers serve its Generator and runtime/engine.py:
// the checks, the filling and padding of prompts, the sampling of a step's chunks (CALM) or tokens (AR)
// and what a row keeps of them. One copy, so a request stops and samples alike whichever runs it.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <string>
#include <vector>

#include "calm_edge.hpp"
#include "model_impl.hpp"
#include "sampling.hpp"

namespace calm_edge {

// A prompt filled to whole chunks as the model expects: "eos, then the prompt" (what calm-edge's models
// saw in training when a document began inside a chunk), or pad ids after it (the released models').
TokenIds fill_to_chunks(const TokenIds& ids, const PackageManifest& m);

struct PaddedBatch {
  TokenIds input_ids;       // [batch, width * K]
  TokenIds attention_mask;  // [batch, width]
  TokenIds position_ids;    // [batch, width], counted from each row's first real chunk
  size_t width = 0;         // in chunks
};

// Whole-chunk rows left-padded to the longest.
PaddedBatch left_pad(const std::vector<TokenIds>& rows, int chunk_size, int64_t pad_id);

void check_params(const GeneratorParams& params);
void check_prompts(const std::vector<TokenIds>& prompts, int chunk_size, int max_context);

// One chunk per row (a pad chunk for finished rows), row r drawing from *rngs[r]. `hidden` is
// [rows, hidden]. Pointers, so that the Engine's requests keep their own streams. The batch approximation
// on a split decoder whose head is row-independent decodes lazily (LazyBatchChoice): the same chunks, with
// the vocabulary projection run on the tokens the choice needs only.
std::vector<Chunk> sample_chunks(const Model::Impl& model, const TemperatureSampler& sampler,
                                 const std::vector<float>& hidden, const std::vector<RandomStream*>& rngs,
                                 const std::vector<bool>& done);

// AR: one token per row from logits [rows, vocab] at temperature 1/n (a pad token for finished rows).
std::vector<Chunk> sample_tokens(const std::vector<float>& logits, size_t vocab, int n,
                                 const std::vector<RandomStream*>& rngs, const std::vector<bool>& done,
                                 int64_t pad_id);

struct Accepted {
  TokenIds kept;       // the part of the chunk the row keeps
  std::string reason;  // why the row stops: "eos", "max_new_tokens", "context", or "" while it runs on
};

// runtime/generator.py's accept_chunk: a row's new chunk cut at max_new_tokens and (if asked) before
// eos; the row also stops when its next position would leave the context. `tokens` are the row's
// tokens so far, `position` its last position.
Accepted accept_chunk(const TokenIds& tokens, const Chunk& chunk, const GeneratorParams& params,
                      const PackageManifest& m, int64_t position);

// The Error for a graph that loads but fails to run: it does not take the inputs this package format
// defines.
Error graph_error(const Model::Impl& model, const Ort::Exception& e);

}  // namespace calm_edge
