defmodule UffPort.Test.MiniJSON do
  @moduledoc """
  The smallest JSON reader the shared vector file needs (OTP 25 has no `:json`
  and the bridge takes no dependencies): objects, arrays, strings with simple
  escapes, integers, true/false/null. The vector file keeps every leaf as hex
  or a decimal string, so nothing subtler is ever required.
  """

  @spec decode!(binary) :: term
  def decode!(text) do
    {value, rest} = value(skip(text))

    case skip(rest) do
      "" ->
        value

      other ->
        raise ArgumentError, "trailing JSON: #{binary_part(other, 0, min(20, byte_size(other)))}"
    end
  end

  defp skip(<<c, rest::binary>>) when c in [?\s, ?\n, ?\r, ?\t], do: skip(rest)
  defp skip(rest), do: rest

  defp value(<<?{, rest::binary>>), do: object(skip(rest), %{})
  defp value(<<?[, rest::binary>>), do: array(skip(rest), [])
  defp value(<<?", rest::binary>>), do: string(rest, [])
  defp value(<<"true", rest::binary>>), do: {true, rest}
  defp value(<<"false", rest::binary>>), do: {false, rest}
  defp value(<<"null", rest::binary>>), do: {nil, rest}
  defp value(rest), do: number(rest, [])

  defp object(<<?}, rest::binary>>, acc), do: {acc, rest}

  defp object(text, acc) do
    <<?", rest::binary>> = text
    {key, rest} = string(rest, [])
    <<?:, rest::binary>> = skip(rest)
    {val, rest} = value(skip(rest))
    acc = Map.put(acc, key, val)

    case skip(rest) do
      <<?,, rest::binary>> -> object(skip(rest), acc)
      <<?}, rest::binary>> -> {acc, rest}
    end
  end

  defp array(<<?], rest::binary>>, acc), do: {Enum.reverse(acc), rest}

  defp array(text, acc) do
    {val, rest} = value(text)

    case skip(rest) do
      <<?,, rest::binary>> -> array(skip(rest), [val | acc])
      <<?], rest::binary>> -> {Enum.reverse([val | acc]), rest}
    end
  end

  defp string(<<?", rest::binary>>, acc), do: {IO.iodata_to_binary(Enum.reverse(acc)), rest}
  defp string(<<?\\, ?n, rest::binary>>, acc), do: string(rest, ["\n" | acc])
  defp string(<<?\\, ?t, rest::binary>>, acc), do: string(rest, ["\t" | acc])

  defp string(<<?\\, c, rest::binary>>, acc) when c in [?", ?\\, ?/],
    do: string(rest, [<<c>> | acc])

  defp string(<<c, rest::binary>>, acc), do: string(rest, [<<c>> | acc])

  defp number(<<c, rest::binary>>, acc) when c in ?0..?9 or c == ?-, do: number(rest, [c | acc])
  defp number(rest, acc), do: {acc |> Enum.reverse() |> List.to_integer(), rest}
end
