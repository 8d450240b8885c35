defmodule UffPort.Test.Gen do
  @moduledoc """
  A small random-term generator for property-style tests (StreamData is a hex
  package, and the bridge builds offline). Explicit seeds make failures
  reproducible: every function takes and returns the `:rand` state.
  """

  import Bitwise

  @int_edges [
    0,
    1,
    31,
    127,
    128,
    255,
    256,
    65_535,
    65_536,
    (1 <<< 32) - 1,
    1 <<< 32,
    (1 <<< 63) - 1,
    (1 <<< 64) - 1,
    -1,
    -32,
    -33,
    -128,
    -129,
    -32_768,
    -32_769,
    -(1 <<< 31),
    -(1 <<< 31) - 1,
    -(1 <<< 63)
  ]

  @doc "A random encodable term nested at most `depth` levels."
  @spec term(:rand.state(), non_neg_integer) :: {term, :rand.state()}
  def term(s, depth) do
    {k, s} = :rand.uniform_s(if(depth > 0, do: 10, else: 8), s)
    gen(k, s, depth)
  end

  defp gen(1, s, _), do: {nil, s}
  defp gen(2, s, _), do: pick([true, false], s)

  defp gen(3, s, _) do
    {edge?, s} = :rand.uniform_s(2, s)

    if edge? == 1 do
      pick(@int_edges, s)
    else
      {bits, s} = :rand.uniform_s(64, s)
      {v, s} = :rand.uniform_s(1 <<< bits, s)
      {neg, s} = :rand.uniform_s(2, s)
      {if(neg == 1 and v <= 1 <<< 63, do: -v, else: v - 1), s}
    end
  end

  defp gen(4, s, _) do
    {bits, s} = :rand.uniform_s(1 <<< 64, s)
    bits = bits - 1

    # An all-ones exponent is NaN/Inf, which the BEAM has no float for: clear one bit.
    bits =
      if (bits &&& 0x7FF0000000000000) == 0x7FF0000000000000,
        do: bits &&& ~~~(1 <<< 62),
        else: bits

    <<f::float-64>> = <<bits::64>>
    {f, s}
  end

  defp gen(5, s, _) do
    {n, s} = :rand.uniform_s(40, s)

    {chars, s} =
      Enum.map_reduce(1..n, s, fn _, s -> pick([?a, ?z, 0, 0xE9, 0x65E5, 0x1F600, ?\n], s) end)

    {List.to_string(chars), s}
  end

  defp gen(6, s, _) do
    {n, s} = :rand.uniform_s(300, s)
    {bytes, s} = :rand.bytes_s(n - 1, s)
    {{:bin, bytes}, s}
  end

  defp gen(7, s, d), do: gen(5, s, d)
  defp gen(8, s, _), do: pick([0.0, -1.5, 1.0e300, 5.0e-324, 0.1], s)

  defp gen(9, s, depth) do
    {n, s} = :rand.uniform_s(8, s)
    Enum.map_reduce(1..(n - 1)//1, s, fn _, s -> term(s, depth - 1) end)
  end

  defp gen(10, s, depth) do
    {n, s} = :rand.uniform_s(8, s)

    {pairs, s} =
      Enum.map_reduce(1..(n - 1)//1, s, fn _, s ->
        {k, s} = gen(5, s, 0)
        {v, s} = term(s, depth - 1)
        {{k, v}, s}
      end)

    {Map.new(pairs), s}
  end

  defp pick(list, s) do
    {i, s} = :rand.uniform_s(length(list), s)
    {Enum.at(list, i - 1), s}
  end

  @doc "Flip, drop or insert random bytes."
  @spec mutate(binary, :rand.state()) :: {binary, :rand.state()}
  def mutate(<<>>, s), do: {<<0xC1>>, s}

  def mutate(bin, s) do
    {op, s} = :rand.uniform_s(3, s)
    {pos, s} = :rand.uniform_s(byte_size(bin), s)
    {byte, s} = :rand.uniform_s(256, s)
    <<head::binary-size(pos - 1), at, tail::binary>> = bin

    case op do
      1 -> {<<head::binary, bxor(at, byte - 1), tail::binary>>, s}
      2 -> {<<head::binary, tail::binary>>, s}
      3 -> {<<head::binary, byte - 1, at, tail::binary>>, s}
    end
  end
end
