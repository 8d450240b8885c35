defmodule UffPort.MsgpackTest do
  use ExUnit.Case, async: true

  alias UffPort.Msgpack
  alias UffPort.Test.{Gen, MiniJSON}

  @vectors_path Path.expand("../../tests/vectors/msgpack_vectors.json", __DIR__)
  @external_resource @vectors_path
  @doc_vectors @vectors_path |> File.read!() |> MiniJSON.decode!() |> Map.fetch!("vectors")

  defp untag(%{"t" => "nil"}), do: nil
  defp untag(%{"t" => "bool", "v" => b}), do: b
  defp untag(%{"t" => "int", "v" => s}), do: String.to_integer(s)

  defp untag(%{"t" => "float", "v" => hex}) do
    <<f::float-64>> = Base.decode16!(hex, case: :lower)
    f
  end

  defp untag(%{"t" => "nan"}), do: :nan
  defp untag(%{"t" => "inf"}), do: :infinity
  defp untag(%{"t" => "-inf"}), do: :neg_infinity
  defp untag(%{"t" => "str", "v" => hex}), do: Base.decode16!(hex, case: :lower)
  defp untag(%{"t" => "bin", "v" => hex}), do: {:bin, Base.decode16!(hex, case: :lower)}
  defp untag(%{"t" => "array", "v" => l}), do: Enum.map(l, &untag/1)

  defp untag(%{"t" => "map", "v" => pairs}),
    do: Map.new(pairs, fn [k, v] -> {untag(k), untag(v)} end)

  defp bytes(vec), do: Base.decode16!(vec["hex"], case: :lower)

  test "the shared vector file is loaded and covers decode, encode and error vectors" do
    kinds = Enum.frequencies_by(@doc_vectors, &{&1["kind"], &1["encode"]})
    assert kinds[{"decode", true}] > 40
    assert kinds[{"decode", false}] > 20
    assert kinds[{"error", nil}] >= 10
  end

  for vec <- @doc_vectors, vec["kind"] == "decode" do
    @vec vec
    test "decode vector: #{vec["name"]}" do
      expected = untag(@vec["value"])
      assert Msgpack.decode(bytes(@vec)) == {:ok, expected}

      if @vec["encode"] do
        # Byte-identical to Python's msgpack.packb(use_bin_type=True).
        assert Msgpack.encode(expected) == {:ok, bytes(@vec)}
      end
    end
  end

  for vec <- @doc_vectors, vec["kind"] == "error" do
    @vec vec
    test "error vector is refused: #{vec["name"]}" do
      assert {:error, _reason} = Msgpack.decode(bytes(@vec))
    end
  end

  test "specific error reasons" do
    assert Msgpack.decode(<<>>) == {:error, :empty}
    assert Msgpack.decode(<<0xC1>>) == {:error, {:reserved_byte, 0xC1}}
    assert Msgpack.decode(<<1, 2, 3>>) == {:error, {:trailing_bytes, 2}}
    assert Msgpack.decode(<<0xD4, 5, 0>>) == {:error, {:unsupported_ext, 5}}
    assert Msgpack.decode(<<0xA2, 0xC3, 0x28>>) == {:error, {:invalid_utf8, <<0xC3, 0x28>>}}
    assert {:error, {:truncated, _}} = Msgpack.decode(<<0xDD, 0xFF, 0xFF, 0xFF, 0xFF, 1>>)
    deep = String.duplicate(<<0x91>>, 100) <> <<0xC0>>
    assert Msgpack.decode(deep) == {:error, {:too_deep, 64}}
  end

  test "every strict prefix of every decode vector is refused, never raises" do
    for vec <- @doc_vectors, vec["kind"] == "decode", data = bytes(vec), byte_size(data) < 2000 do
      for n <- 0..(byte_size(data) - 1) do
        assert {:error, _} = Msgpack.decode(binary_part(data, 0, n)), "#{vec["name"]} prefix #{n}"
      end
    end
  end

  test "encoder refuses what the wire cannot carry and sends non-finite atoms as nil" do
    assert {:error, {:unencodable, _}} = Msgpack.encode(2 ** 64)
    assert {:error, {:unencodable, _}} = Msgpack.encode(-(2 ** 63) - 1)
    assert {:error, {:unencodable, _}} = Msgpack.encode(<<0xFF>>)
    assert {:error, {:unencodable, _}} = Msgpack.encode({1, 2})
    assert {:error, {:unencodable, _}} = Msgpack.encode([1 | 2])
    assert {:error, {:unencodable, _}} = Msgpack.encode(self())
    assert Msgpack.encode([:nan, :infinity, :neg_infinity]) == {:ok, <<0x93, 0xC0, 0xC0, 0xC0>>}
    assert Msgpack.encode(:local) == {:ok, <<0xA5, "local">>}
    assert_raise ArgumentError, fn -> Msgpack.encode!(self()) end
  end

  test "32-bit array and map headers round-trip" do
    list = List.duplicate(1, 70_000)
    {:ok, bin} = Msgpack.encode(list)
    assert <<0xDD, 70_000::32, _::binary>> = bin
    assert Msgpack.decode(bin) == {:ok, list}
    map = Map.new(1..70_000, &{&1, &1})
    {:ok, bin} = Msgpack.encode(map)
    assert <<0xDF, 70_000::32, _::binary>> = bin
    assert Msgpack.decode(bin) == {:ok, map}
  end

  test "property: decode(encode(t)) == t for generated terms" do
    seed = :rand.seed(:exsss, {101, 202, 303})

    Enum.reduce(1..600, seed, fn i, seed ->
      {term, seed} = Gen.term(seed, 4)
      {:ok, bin} = Msgpack.encode(term)
      assert Msgpack.decode(bin) == {:ok, term}, "case #{i}: #{inspect(term, limit: 20)}"
      seed
    end)
  end

  test "property: random and mutated bytes never raise" do
    seed = :rand.seed(:exsss, {7, 8, 9})

    Enum.reduce(1..1500, seed, fn _, seed ->
      {term, seed} = Gen.term(seed, 3)
      bin = Msgpack.encode!(term)
      {bin, seed} = Gen.mutate(bin, seed)
      result = Msgpack.decode(bin)
      assert match?({:ok, _}, result) or match?({:error, _}, result)
      seed
    end)
  end
end
