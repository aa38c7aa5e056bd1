"""The train-step shape flags shared by bench_train and profile_step."""
import argparse


def add_flags(p: argparse.ArgumentParser) -> None:
  """Sequence, batch, width, heads, layers, recursions, dtype, attention and remat flags."""
  p.add_argument("--seq_len", type=int, default=512)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--num_heads", type=int, default=4)
  p.add_argument("--num_kv_heads", type=int, default=2)
  p.add_argument("--ffn_dim", type=int, default=0, help="0: 3 x d_model")
  p.add_argument("--num_layers", type=int, default=8)
  p.add_argument("--num_recursions", type=int, default=3)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--attention", default="", help="model.attention ('' = config default)")
  p.add_argument("--remat", action="store_true")


def config(name: str, args: argparse.Namespace):
  """bench.train_bench_config for model `name` at the flags' shape (imports mor lazily)."""
  from mor import bench
  return bench.train_bench_config(
      name, vocab=args.vocab, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
      ffn_dim=args.ffn_dim, remat=args.remat, attention=args.attention, seq_len=args.seq_len,
      batch=args.batch, d_model=args.d_model, num_layers=args.num_layers,
      num_recursions=args.num_recursions, dtype=args.dtype)
