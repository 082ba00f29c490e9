// For the tests only: quantize_8bit, the kernels' own block quantizer (quantizer.cpp) run as the 8-bit steps run it,
// so that the tests can hold its codes to torchlamb.quantized's.

// x (float32, contiguous, rows of `row` elements) into codes and one absmax per block (flat), then read back (flat),
// with the functions the steps use. `tables`: one map's.
std::vector<torch::Tensor> quantize_8bit(torch::Tensor x, std::vector<torch::Tensor> tables, bool floor,
                                         int64_t row) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.is_cpu() && tables.size() == 2 &&
                  row > 0 && x.numel() % row == 0,
              "torchlamb fused: quantize_8bit takes a contiguous float32 CPU tensor of whole rows and one code map");
  const CodeMap map = code_map(tables, 0);
  const Blocks blocks(row);
  const int64_t n = x.numel();
  auto codes = torch::empty({n}, torch::kUInt8);
  auto absmax = torch::empty({n / row * blocks.per_row}, torch::kFloat32);
  auto back = torch::empty({n}, torch::kFloat32);
  const float* values = x.data_ptr<float>();
  for (int64_t start = 0, len = 0; start < n; start += len) {
    len = blocks.length(start, n);
    const float scale = absmax_of(values + start, len);
    absmax.data_ptr<float>()[blocks.index(start)] = scale;
    map.encode_block(values + start, len, scale, floor, codes.data_ptr<uint8_t>() + start);
    map.decode_block(codes.data_ptr<uint8_t>() + start, len, scale, back.data_ptr<float>() + start);
  }
  return {codes, absmax, back};
}
