defmodule UffPort.Error do
  @moduledoc """
  The one error type of the bridge: every public function returns
  `{:ok, value} | {:error, %UffPort.Error{}}` and callers match on `code`.

  ## Codes raised by the bridge itself

    * `:start_timeout` - no `hello` within `:start_timeout`; the OS process was killed.
    * `:start_failed` - the worker exited before `hello` (`details` has the exit
      status and the last stderr lines).
    * `:bad_hello` - the first frame was not a protocol-1 `hello`.
    * `:response_timeout` - no reply within the call's deadline. The worker is
      then stopped (shutdown -> SIGTERM -> SIGKILL) and the GenServer exits, so
      its supervisor restarts it in a known state.
    * `:worker_down` - the worker GenServer died or stopped before replying.
    * `:unencodable` - the request's args cannot be encoded as MessagePack.

  ## Codes sent by the worker

  An `{"ok": false}` reply becomes an error whose `code` is the wire code as an
  atom when it is one of protocol v1's codes (`:busy`, `:no_job`,
  `:invalid_config`, ... see `docs/protocol.md`), otherwise `:remote_error`
  with the wire code in `details["code"]`. `message` and `details` are the
  worker's.
  """

  defexception [:code, :message, :details]

  @type t :: %__MODULE__{code: atom, message: String.t(), details: term}

  # protocol v1 codes (uff_port/protocol/errors.py; tests/test_error_codes.py keeps this list
  # equal to that table); never create atoms from the wire.
  @wire_codes ~w(frame_too_large truncated_frame malformed_frame invalid_request unknown_command
                 invalid_args invalid_config not_available busy no_job not_found
                 checkpoint_failed corrupt_checkpoint trainer_failed timeout shutting_down
                 wont_fit disk_full non_finite invalid_manifest verify_failed gate_failed
                 alias_conflict inconsistent_release invalid_gates internal
                 release_held hub_failed reload_failed invalid_slo unsafe_path
                 model_not_found checkpoint_mismatch out_of_memory too_many_bad_lines
                 no_data data_not_found data_cursor_mismatch)

  @doc false
  @spec new(atom, String.t(), term) :: t
  def new(code, message, details \\ nil),
    do: %__MODULE__{code: code, message: message, details: details}

  @doc "Builds the error for an `{\"ok\": false, \"error\": map}` reply."
  @spec from_wire(term) :: t
  def from_wire(%{"code" => code} = err) when is_binary(code) do
    message = if is_binary(err["message"]), do: err["message"], else: code

    if code in @wire_codes do
      new(String.to_atom(code), message, err["details"])
    else
      new(:remote_error, message, %{"code" => code, "details" => err["details"]})
    end
  end

  def from_wire(other), do: new(:remote_error, "malformed error reply", other)
end
