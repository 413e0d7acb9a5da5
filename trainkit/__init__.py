"""Plumbing that the course's scripts share and that no lesson teaches; a student can treat it as a library.

    cli           one-line errors, the device, presets, metrics.json
    precision     which arithmetic a run uses (fp32, bf16 or fp16 autocast), chosen by measuring
    distributed   torchrun's processes: each process's share of a batch, agreeing on a number
    runs          stopping after the step on Ctrl-C or SIGTERM, atomic checkpoints, resuming exactly
    pictures      loss and accuracy curves, attention maps: PNGs written atomically
    training      TrainStep: autocast, fp16 loss scaling, DDP and clipping around the optimizer step
    compiling     whether the training step runs through torch.compile, chosen by measuring
    kernels       which matmul kernels a decoding step runs on, chosen by measuring
    losses        the chunked cross-entropy of large vocabularies

The names a lesson calls are importable from the package itself: `trainkit.is_main()`, `trainkit.UserError`.
"""

from trainkit.cli import (UserError, fill_preset, one_line_errors, OneLineParser, pick_device, print_metrics,  # noqa: F401
                          write_metrics)
from trainkit.distributed import (EpochSampler, all_reduce, gather_rows, init_distributed, is_main,  # noqa: F401
                                  local_share, main_first, per_process_batch, quiet_unless_main, rank, same_on_all,
                                  shard_rows, sync_gradients, teardown_distributed, world_size, wrap_ddp)
from trainkit.precision import PRECISIONS, Precision, choose_precision  # noqa: F401
from trainkit.training import TrainStep  # noqa: F401
from trainkit.compiling import COMPILE_MODES, CompiledForward  # noqa: F401
from trainkit.runs import (Budget, StopRequest, atomic_save, exit_code, last_checkpoint_path, read_checkpoint,  # noqa: F401
                           read_resume_state, rng_state, set_rng_state, stopped_note)
from trainkit import kernels, losses, pictures  # noqa: F401,E402  (trainkit.pictures.smooth, ... after `import trainkit`)
