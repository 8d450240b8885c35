defmodule UffPort.Msgpack do
  @moduledoc """
  MessagePack codec for the worker's wire format, with no dependencies.

      iex> {:ok, bin} = UffPort.Msgpack.encode(%{"id" => 1, "cmd" => "ping"})
      iex> UffPort.Msgpack.decode(bin)
      {:ok, %{"cmd" => "ping", "id" => 1}}

  ## Decoding

  Every type of the format is read: nil, booleans, ints of every width, float32
  and float64, str (checked to be UTF-8), bin, arrays, maps (any key type),
  nested to 64 levels. Results:

    * str -> binary; bin -> `{:bin, binary}` so the two never get confused;
    * NaN and infinities (any bit pattern, float32 or float64) -> `:nan`,
      `:infinity`, `:neg_infinity`: the BEAM has no such floats, and a stray
      one from a buggy sender must not crash the reader;
    * ext types (including the timestamp ext) -> `{:error, {:unsupported_ext, type}}`:
      the protocol has no use for them.

  Malformed input never raises: `decode/1` returns `{:error, reason}` with one of
  `:empty`, `{:truncated, what}`, `{:reserved_byte, 0xC1}`, `{:invalid_utf8, bytes}`,
  `{:unsupported_ext, type}`, `{:too_deep, max}`, `{:trailing_bytes, n}`.
  Announced lengths are never trusted for allocation: a 4G-element array whose
  elements are missing fails as `{:truncated, ...}` after reading what exists.

  ## Encoding

  What a client sends: `nil`, booleans, integers in `-2^63..2^64-1`, floats
  (always float64), binaries (as str; they must be UTF-8), `{:bin, binary}`
  (as bin), other atoms (as str), lists, maps. Widths are the smallest that
  fit, byte-identical to Python's `msgpack.packb(use_bin_type=True)`.
  `:nan`, `:infinity` and `:neg_infinity` are sent as nil: non-finite floats
  never go on the wire (contract). Anything else is
  `{:error, {:unencodable, term}}`.
  """

  import Bitwise

  @max_depth 64

  @type value ::
          nil
          | boolean
          | integer
          | float
          | :nan
          | :infinity
          | :neg_infinity
          | String.t()
          | {:bin, binary}
          | [value]
          | %{optional(value) => value}

  @type reason ::
          :empty
          | {:truncated, atom}
          | {:reserved_byte, 0xC1}
          | {:invalid_utf8, binary}
          | {:unsupported_ext, integer}
          | {:too_deep, pos_integer}
          | {:trailing_bytes, pos_integer}

  # ---------------------------------------------------------------- decode

  @doc """
  Decodes exactly one value. Returns `{:ok, value}` or `{:error, reason}`
  (see the module doc for every reason); never raises.
  """
  @spec decode(binary) :: {:ok, value} | {:error, reason}
  def decode(<<>>), do: {:error, :empty}

  def decode(data) when is_binary(data) do
    case dec(data, 0) do
      {value, <<>>} -> {:ok, value}
      {_value, rest} -> {:error, {:trailing_bytes, byte_size(rest)}}
    end
  catch
    {:msgpack_error, reason} -> {:error, reason}
  end

  @spec fail(reason) :: no_return
  defp fail(reason), do: throw({:msgpack_error, reason})

  defp dec(_data, depth) when depth > @max_depth, do: fail({:too_deep, @max_depth})
  defp dec(<<>>, _depth), do: fail({:truncated, :value})
  # fixint, fixmap, fixarray, fixstr
  defp dec(<<0::1, v::7, rest::binary>>, _), do: {v, rest}
  defp dec(<<0b1000::4, n::4, rest::binary>>, d), do: dec_map(rest, n, d + 1, [])
  defp dec(<<0b1001::4, n::4, rest::binary>>, d), do: dec_array(rest, n, d + 1, [])
  defp dec(<<0b101::3, n::5, rest::binary>>, _), do: dec_str(rest, n)
  defp dec(<<0xC0, rest::binary>>, _), do: {nil, rest}
  defp dec(<<0xC1, _::binary>>, _), do: fail({:reserved_byte, 0xC1})
  defp dec(<<0xC2, rest::binary>>, _), do: {false, rest}
  defp dec(<<0xC3, rest::binary>>, _), do: {true, rest}
  # bin 8/16/32
  defp dec(<<0xC4, n::8, rest::binary>>, _), do: dec_bin(rest, n)
  defp dec(<<0xC5, n::16, rest::binary>>, _), do: dec_bin(rest, n)
  defp dec(<<0xC6, n::32, rest::binary>>, _), do: dec_bin(rest, n)
  # ext 8/16/32 and fixext: refused after checking the type byte is there
  defp dec(<<0xC7, _n::8, t::signed-8, _::binary>>, _), do: fail({:unsupported_ext, t})
  defp dec(<<0xC8, _n::16, t::signed-8, _::binary>>, _), do: fail({:unsupported_ext, t})
  defp dec(<<0xC9, _n::32, t::signed-8, _::binary>>, _), do: fail({:unsupported_ext, t})
  defp dec(<<b, t::signed-8, _::binary>>, _) when b in 0xD4..0xD8, do: fail({:unsupported_ext, t})
  # floats: match the bit pattern first, so NaN/Inf never reach float construction
  defp dec(<<0xCA, bits::32, rest::binary>>, _), do: {float32(bits), rest}
  defp dec(<<0xCB, bits::64, rest::binary>>, _), do: {float64(bits), rest}
  # unsigned and signed ints
  defp dec(<<0xCC, v::8, rest::binary>>, _), do: {v, rest}
  defp dec(<<0xCD, v::16, rest::binary>>, _), do: {v, rest}
  defp dec(<<0xCE, v::32, rest::binary>>, _), do: {v, rest}
  defp dec(<<0xCF, v::64, rest::binary>>, _), do: {v, rest}
  defp dec(<<0xD0, v::signed-8, rest::binary>>, _), do: {v, rest}
  defp dec(<<0xD1, v::signed-16, rest::binary>>, _), do: {v, rest}
  defp dec(<<0xD2, v::signed-32, rest::binary>>, _), do: {v, rest}
  defp dec(<<0xD3, v::signed-64, rest::binary>>, _), do: {v, rest}
  # str 8/16/32, array 16/32, map 16/32
  defp dec(<<0xD9, n::8, rest::binary>>, _), do: dec_str(rest, n)
  defp dec(<<0xDA, n::16, rest::binary>>, _), do: dec_str(rest, n)
  defp dec(<<0xDB, n::32, rest::binary>>, _), do: dec_str(rest, n)
  defp dec(<<0xDC, n::16, rest::binary>>, d), do: dec_array(rest, n, d + 1, [])
  defp dec(<<0xDD, n::32, rest::binary>>, d), do: dec_array(rest, n, d + 1, [])
  defp dec(<<0xDE, n::16, rest::binary>>, d), do: dec_map(rest, n, d + 1, [])
  defp dec(<<0xDF, n::32, rest::binary>>, d), do: dec_map(rest, n, d + 1, [])
  # negative fixint
  defp dec(<<0b111::3, v::5, rest::binary>>, _), do: {v - 32, rest}
  # a known type byte whose fixed-size body is cut short
  defp dec(<<_b, _::binary>>, _), do: fail({:truncated, :header})

  defp dec_str(data, n) do
    case data do
      <<s::binary-size(n), rest::binary>> ->
        if String.valid?(s),
          do: {s, rest},
          else: fail({:invalid_utf8, binary_part(s, 0, min(n, 16))})

      _ ->
        fail({:truncated, :str})
    end
  end

  defp dec_bin(data, n) do
    case data do
      <<b::binary-size(n), rest::binary>> -> {{:bin, b}, rest}
      _ -> fail({:truncated, :bin})
    end
  end

  defp dec_array(rest, 0, _d, acc), do: {:lists.reverse(acc), rest}
  defp dec_array(<<>>, _n, _d, _acc), do: fail({:truncated, :array})

  defp dec_array(data, n, d, acc) do
    {v, rest} = dec(data, d)
    dec_array(rest, n - 1, d, [v | acc])
  end

  defp dec_map(rest, 0, _d, acc), do: {:maps.from_list(acc), rest}
  defp dec_map(<<>>, _n, _d, _acc), do: fail({:truncated, :map})

  defp dec_map(data, n, d, acc) do
    {k, rest} = dec(data, d)
    if rest == <<>>, do: fail({:truncated, :map})
    {v, rest} = dec(rest, d)
    dec_map(rest, n - 1, d, [{k, v} | acc])
  end

  # Exponent all ones: infinity when the mantissa is zero, NaN otherwise.
  defp float32(bits) when (bits &&& 0x7F800000) == 0x7F800000,
    do: special(bits >>> 31, bits &&& 0x7FFFFF)

  defp float32(bits) do
    <<f::float-32>> = <<bits::32>>
    f
  end

  defp float64(bits) when (bits &&& 0x7FF0000000000000) == 0x7FF0000000000000,
    do: special(bits >>> 63, bits &&& 0xFFFFFFFFFFFFF)

  defp float64(bits) do
    <<f::float-64>> = <<bits::64>>
    f
  end

  defp special(_sign, mantissa) when mantissa != 0, do: :nan
  defp special(0, 0), do: :infinity
  defp special(1, 0), do: :neg_infinity

  # ---------------------------------------------------------------- encode

  @doc """
  Encodes a value (see the module doc for the accepted terms).
  Returns `{:ok, iodata_binary}` or `{:error, {:unencodable, term}}`.
  """
  @spec encode(term) :: {:ok, binary} | {:error, {:unencodable, term}}
  def encode(term) do
    {:ok, IO.iodata_to_binary(enc(term))}
  catch
    {:msgpack_error, reason} -> {:error, reason}
  end

  @doc "Like `encode/1` but raises `ArgumentError` on an unencodable term."
  @spec encode!(term) :: binary
  def encode!(term) do
    case encode(term) do
      {:ok, bin} -> bin
      {:error, reason} -> raise ArgumentError, "cannot encode as MessagePack: #{inspect(reason)}"
    end
  end

  defp enc(nil), do: <<0xC0>>
  defp enc(false), do: <<0xC2>>
  defp enc(true), do: <<0xC3>>
  defp enc(a) when a in [:nan, :infinity, :neg_infinity], do: <<0xC0>>
  defp enc(i) when is_integer(i), do: enc_int(i)
  defp enc(f) when is_float(f), do: <<0xCB, f::float-64>>

  defp enc(s) when is_binary(s) do
    if String.valid?(s), do: [str_header(byte_size(s)), s], else: fail({:unencodable, s})
  end

  defp enc({:bin, b}) when is_binary(b), do: [bin_header(byte_size(b)), b]
  defp enc(a) when is_atom(a), do: enc(Atom.to_string(a))
  defp enc(l) when is_list(l), do: enc_list(l)

  defp enc(m) when is_map(m) and not is_struct(m) do
    [map_header(map_size(m)) | Enum.map(m, fn {k, v} -> [enc(k), enc(v)] end)]
  end

  defp enc(other), do: fail({:unencodable, other})

  defp enc_list(l) do
    # length/1 raises on an improper list; report it as unencodable instead.
    n =
      try do
        length(l)
      rescue
        ArgumentError -> fail({:unencodable, l})
      end

    [array_header(n) | Enum.map(l, &enc/1)]
  end

  defp enc_int(i) when i >= 0 and i < 0x80, do: <<i>>
  defp enc_int(i) when i >= 0 and i < 0x100, do: <<0xCC, i>>
  defp enc_int(i) when i >= 0 and i < 0x10000, do: <<0xCD, i::16>>
  defp enc_int(i) when i >= 0 and i < 0x100000000, do: <<0xCE, i::32>>
  defp enc_int(i) when i >= 0 and i < 0x10000000000000000, do: <<0xCF, i::64>>
  defp enc_int(i) when i < 0 and i >= -32, do: <<i::signed-8>>
  defp enc_int(i) when i < 0 and i >= -0x80, do: <<0xD0, i::signed-8>>
  defp enc_int(i) when i < 0 and i >= -0x8000, do: <<0xD1, i::signed-16>>
  defp enc_int(i) when i < 0 and i >= -0x80000000, do: <<0xD2, i::signed-32>>
  defp enc_int(i) when i < 0 and i >= -0x8000000000000000, do: <<0xD3, i::signed-64>>
  defp enc_int(i), do: fail({:unencodable, i})

  defp str_header(n) when n < 32, do: <<0b101::3, n::5>>
  defp str_header(n) when n < 0x100, do: <<0xD9, n>>
  defp str_header(n) when n < 0x10000, do: <<0xDA, n::16>>
  defp str_header(n) when n < 0x100000000, do: <<0xDB, n::32>>

  defp bin_header(n) when n < 0x100, do: <<0xC4, n>>
  defp bin_header(n) when n < 0x10000, do: <<0xC5, n::16>>
  defp bin_header(n) when n < 0x100000000, do: <<0xC6, n::32>>

  defp array_header(n) when n < 16, do: <<0b1001::4, n::4>>
  defp array_header(n) when n < 0x10000, do: <<0xDC, n::16>>
  defp array_header(n), do: <<0xDD, n::32>>

  defp map_header(n) when n < 16, do: <<0b1000::4, n::4>>
  defp map_header(n) when n < 0x10000, do: <<0xDE, n::16>>
  defp map_header(n), do: <<0xDF, n::32>>
end
