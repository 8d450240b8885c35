defmodule UffPort.CampaignJournal do
  @moduledoc """
  The campaign's journal: `<campaign dir>/journal.bin`, append-only records,
  each a 4-byte big-endian length then one MessagePack map (the wire's
  framing), fsynced before `append/2` returns. `UffPort.Campaign` writes a
  record *before* acting on the transition it names, so replaying the file
  gives back everything the campaign decided.

  A torn tail (the VM died mid-append: a short header, a short body, or an
  undecodable last record) is cut off when the journal is opened, so the next
  record never lands after garbage. Damage before the last record is not
  guessed around: `open/1` returns `{:error, {:journal_damaged, offset, why}}`.
  Python reads the same file (`uff_port.campaign.journal`); docs/campaign.md
  section "Journal" is the contract.
  """

  alias UffPort.Msgpack

  import Bitwise

  @name "journal.bin"
  @max_record 1 <<< 20

  defstruct [:path, :fd, seq: 0]

  @type t :: %__MODULE__{path: String.t(), fd: term, seq: non_neg_integer}

  @doc "The journal file of `dir`."
  @spec path(String.t()) :: String.t()
  def path(dir), do: Path.join(dir, @name)

  @doc "Opens (creating) the journal of `dir`; returns it and the records already there."
  @spec open(String.t()) :: {:ok, t, [map]} | {:error, term}
  def open(dir) do
    File.mkdir_p!(dir)
    file = path(dir)

    data =
      case File.read(file) do
        {:ok, d} -> d
        {:error, :enoent} -> ""
        {:error, why} -> throw({:error, {:journal_unreadable, why}})
      end

    with {:ok, records, good} <- parse(data),
         :ok <- cut(file, good, byte_size(data)),
         {:ok, fd} <- :file.open(file, [:append, :binary, :raw]) do
      seq =
        Enum.reduce(records, 0, fn r, acc -> max(acc, (is_integer(r["seq"]) && r["seq"]) || 0) end)

      {:ok, %__MODULE__{path: file, fd: fd, seq: seq}, records}
    end
  catch
    {:error, _} = err -> err
  end

  @doc "Reads the records of `dir` without opening it for writing (status)."
  @spec read(String.t()) :: {:ok, [map], non_neg_integer} | {:error, term}
  def read(dir) do
    case File.read(path(dir)) do
      {:ok, data} ->
        with {:ok, records, good} <- parse(data), do: {:ok, records, byte_size(data) - good}

      {:error, why} ->
        {:error, {:journal_unreadable, why}}
    end
  end

  @doc "Appends `record` (a map with a string `\"kind\"`) with `seq` and `t`; fsynced."
  @spec append(t, map) :: {:ok, t, map}
  def append(%__MODULE__{fd: fd} = j, %{"kind" => kind} = record) when is_binary(kind) do
    seq = j.seq + 1
    full = Map.merge(record, %{"seq" => seq, "t" => System.os_time(:millisecond) / 1000})
    body = Msgpack.encode!(full)

    if byte_size(body) > @max_record,
      do: raise(ArgumentError, "journal record of #{byte_size(body)} bytes is over the limit")

    :ok = :file.write(fd, <<byte_size(body)::32, body::binary>>)
    :ok = :file.sync(fd)
    {:ok, %{j | seq: seq}, full}
  end

  @doc "Closes the file."
  @spec close(t) :: :ok
  def close(%__MODULE__{fd: fd}), do: :file.close(fd)

  @doc """
  Splits framed records: `{:ok, records, bytes_used}`; a torn tail is left
  out of `bytes_used`; damage before the last record is an error.
  """
  @spec parse(binary) :: {:ok, [map], non_neg_integer} | {:error, term}
  def parse(data), do: parse(data, 0, [])

  defp parse(data, pos, acc) when pos == byte_size(data), do: {:ok, Enum.reverse(acc), pos}

  defp parse(data, pos, acc) do
    case data do
      <<_::binary-size(pos), size::32, rest::binary>> when byte_size(rest) >= size ->
        <<body::binary-size(size), tail::binary>> = rest
        last? = tail == <<>>

        case decode(body, size) do
          {:ok, rec} -> parse(data, pos + 4 + size, [rec | acc])
          {:error, _} when last? -> {:ok, Enum.reverse(acc), pos}
          {:error, why} -> {:error, {:journal_damaged, pos, why}}
        end

      _ ->
        # fewer than 4 header bytes, or a body reaching past the end: a torn tail
        {:ok, Enum.reverse(acc), pos}
    end
  end

  defp decode(_body, size) when size > @max_record, do: {:error, {:record_too_large, size}}

  defp decode(body, _size) do
    case Msgpack.decode(body) do
      {:ok, %{"kind" => k} = rec} when is_binary(k) -> {:ok, rec}
      {:ok, _} -> {:error, :not_a_record}
      err -> err
    end
  end

  defp cut(_file, good, size) when good == size, do: :ok

  defp cut(file, good, _size) do
    {:ok, fd} = :file.open(file, [:read, :write, :binary, :raw])

    try do
      {:ok, _} = :file.position(fd, good)
      :ok = :file.truncate(fd)
      :file.sync(fd)
    after
      :file.close(fd)
    end
  end
end
