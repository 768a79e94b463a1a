"""Plan the paper-scale commands on a CPU: memory by kind, FLOPs and seconds per update, and the largest batch that
fits on one 80 GB GPU, from fake tensors (no GPU, no weights). `python benchmark/scale.py --plan` calls plan().

1. Trace. Each network an update runs (scale.py's public configs) is built under PyTorch's FakeTensorMode (tensors
   with shapes and dtypes, no memory, no arithmetic) and called once as the update calls it: `train` (forward and
   backward, trainable weights), `input` (frozen weights, the gradient flows back to its input: add.py's VAE decoder
   and DINOv2 under the adversarial loss) or `nograd` (forward only), at the row's resolution, precision (bf16
   autocast, the scripts' default on a GPU; fp32 for the CPU check) and --gradient-checkpointing, at two small
   batches (1 and 2). probe.LiveMemory counts every storage the call creates for as long as it lives: `saved` is
   what the forward leaves for the backward, `extra` the most held at once besides the weights' gradients,
   `extra_first` with the gradients the call creates (the first micro-batch of a step, after zero_grad). Why not
   MemTracker (torch.distributed._tools.mem_tracker): it hooks every parameter (frozen ones refuse the hook) and
   stops at a root module run twice; why not torch.autograd.graph.saved_tensors_hooks: they see what the
   backward keeps, not the temporaries and the recomputation of --gradient-checkpointing that make the peak.
   torch.utils.flop_counter.FlopCounterMode counts the FLOPs. All grow linearly in the batch: two batches give the
   line. Traces are cached (WORK/traces.json) and run two at a time (one process per core).
2. Compose. Weights, gradients and AdamW state are exact counts of the networks' tensors (fp32 weights and
   gradients; two fp32 moments and a step per tensor). The peak is the largest of: weights + gradients + AdamW
   state (the optimiser step), and each phase of the update in the order dmd.py / add.py run it (compose()).
3. Check. `scale.py --plan-check` runs real commands through probe.measure under the same LiveMemory (the whole
   update of the real script, fp32 on the CPU) and in a subprocess for its peak resident memory, and sets the plan
   of the same sizes beside both.

Only what the tensors hold is planned: the CUDA context (~0.5 GiB), the caching allocator's slack and cuDNN /
cuBLAS workspaces come on top, hence a 78 GiB budget for an 80 GB card. bf16 rows cast as CUDA's autocast does
(cuda_autocast: its op lists, on the CPU's fake tensors). Attention runs through scaled_dot_product_attention's
CPU kernel (flash-style: no sequence x sequence matrix kept for the backward), as the GPU's flash and
memory-efficient kernels do.
"""
import concurrent.futures
import contextlib
import json
import os
import re
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmark"))
GiB = 2 ** 30
BUDGET_GIB = 78.0        # an 80 GB H100 as this project's GPU tool reports it (about 78 GiB usable)
H100_TFLOPS = 989.4      # dense bf16 peak (SXM): seconds per update at 100 % and 40 % MFU
BATCHES = (1, 2)         # the two traced batches
UNETS = ("in64", "sd15", "sdxl")


# ----------------------------------------------------------------------------------------------------------
# 1. Trace: one network, one way of calling it, one batch, under fake tensors
# ----------------------------------------------------------------------------------------------------------
def build(net, tiny, res, batch, lora, dtype):
    """(module, its inputs, call(module) -> a tensor to take the gradient of) for `net` at this batch and
    resolution, weights and inputs in `dtype` (fp32; fp16 for eval.py latency --fp16), under FakeTensorMode.
    Modules are built in `dtype` (the default dtype meanwhile) and Module.to() is a no-op while they are: it
    cannot swap fake parameters (they carry weak references), and peft's adapter placement calls it (same device,
    same dtype here)."""
    import torch
    old_dtype, to = torch.get_default_dtype(), torch.nn.Module.to
    from transformers.initialization import no_init_weights  # DINOv2's truncated-normal init reads values
    torch.set_default_dtype(dtype)
    torch.nn.Module.to = lambda self, *a, **k: self
    try:
        with no_init_weights():
            return _build(net, tiny, res, batch, lora, dtype)
    finally:
        torch.set_default_dtype(old_dtype)
        torch.nn.Module.to = to


def _build(net, tiny, res, batch, lora, dtype):
    import scale
    import torch
    b, lat = batch, res // (2 if tiny else 8)
    randn = lambda *shape: torch.randn(*shape, dtype=dtype)  # noqa: E731
    if net == "in64":
        from diffusers import UNet2DModel
        cfg = scale.in64_config(tiny)
        s = cfg["sample_size"]
        x, t, c = randn(b, 3, s, s), torch.full((b,), 3.0), torch.zeros(b, dtype=torch.long)
        return UNet2DModel(**cfg), [x], lambda m: m(x, t, class_labels=c).sample
    if net in ("sd15", "sdxl"):
        from diffusers import UNet2DConditionModel
        xl = net == "sdxl"
        cfg = scale.sd_unet_config(xl, tiny)
        unet = UNet2DConditionModel(**cfg)
        if lora:   # add.py --lora-rank: peft adapters on the attention projections
            sys.path.insert(0, ROOT)
            import add
            unet = add.add_lora(unet, lora)
        x, t = randn(b, 4, lat, lat), torch.full((b,), 999)
        ehs = randn(b, 8 if tiny else 77, cfg["cross_attention_dim"])
        kw = {}
        if xl:
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            kw = {"added_cond_kwargs": {"text_embeds": randn(b, pooled), "time_ids": torch.zeros(b, 6)}}
        return unet, [x], lambda m: m(x, t, encoder_hidden_states=ehs, **kw).sample
    if net in ("vae_enc", "vae_dec"):
        from diffusers import AutoencoderKL
        vae = AutoencoderKL(**scale.vae_config(False, tiny))
        if net == "vae_dec":
            z = randn(b, 4, lat, lat)
            return vae, [z], lambda m: m.decode(z).sample
        img = randn(b, 3, res, res)
        return vae, [img], lambda m: m.encode(img).latent_dist.sample()
    if net in ("clip_l", "clip_g"):
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
        cfgs = scale.text_configs(True, tiny, 54)
        cls, cfg = (CLIPTextModelWithProjection, cfgs[1]) if net == "clip_g" else (CLIPTextModel, cfgs[0])
        ids = torch.zeros(b, cfg["max_position_embeddings"], dtype=torch.long)
        return cls(CLIPTextConfig(**cfg)), [], lambda m: m(ids, output_hidden_states=True)[0]
    if net == "dino":   # add.py's FeatureNetwork: 4 evenly spaced blocks' tokens and the pooled output
        from transformers import Dinov2Config, Dinov2Model
        cfg = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, mlp_ratio=4,
                   image_size=518, layerscale_value=1.0)
        if tiny:
            cfg.update(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, patch_size=4, image_size=16)
        n, img = cfg["num_hidden_layers"], randn(b, 3, 16 if tiny else 224, 16 if tiny else 224)

        def call(m):
            out = m(pixel_values=img, output_hidden_states=True)
            return sum(out.hidden_states[round((i + 1) * n / 4)].float().sum() for i in range(4)) + \
                out.pooler_output.float().sum()
        return Dinov2Model(Dinov2Config(**cfg)), [img], call
    if net == "lpips":   # dmd.py --reg-loss lpips: LPIPS-VGG (a random VGG16: its weights are a download) at 224
        import lpips
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
        x, y = randn(b, 3, 224, 224), randn(b, 3, 224, 224)
        return m, [x], lambda m: m(x, y).sum()
    if net.startswith("heads"):   # add.py's four StyleGAN-T heads on DINOv2 tokens, projection on c (headsWIDTH)
        sys.path.insert(0, ROOT)
        import add
        dim, tokens, cond = (16, 17, int(net[5:])) if tiny else (384, 257, int(net[5:]))
        heads = torch.nn.ModuleList(add.StyleGANTHead(dim, cond) for _ in range(4))
        feats, c = [randn(b, tokens, dim) for _ in range(4)], randn(b, cond)
        return heads, feats, lambda m: sum(h(f, c).sum() for h, f in zip(m, feats))
    raise ValueError(f"unknown network {net}")


# CUDA autocast's op lists (PyTorch's aten/src/ATen/autocast_mode.h: lower precision, float32, float32 through the op's
# dtype argument, promote), by the name of the Python function that reaches each op. The CPU's own lists differ
# (they keep group_norm, layer_norm and softmax in bf16), and a GPU's memory is what is planned.
CUDA_LOWER = {"conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
              "prelu", "addmm", "addmv", "addr", "matmul", "__matmul__", "__rmatmul__", "einsum", "mm", "mv", "vecdot",
              "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "multi_dot", "lstm_cell", "gru_cell",
              "rnn_tanh_cell", "rnn_relu_cell", "scaled_dot_product_attention"}
CUDA_FP32 = {"acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
             "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "group_norm", "nuclear_norm",
             "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "hinge_embedding_loss",
             "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
             "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
             "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp", "interpolate",
             "upsample", "upsample_nearest", "upsample_bilinear"}
CUDA_FP32_DTYPE = {"prod", "softmax", "log_softmax", "cumprod", "cumsum", "vector_norm", "matrix_norm", "sum", "norm"}
CUDA_PROMOTE = {"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sample", "index_put",
                "tensordot", "scatter_add"}   # the widest floating type of their inputs


def cuda_autocast(dtype):
    """A TorchFunctionMode that casts as CUDA's autocast does, on any device: the inputs of CUDA_LOWER ops to `dtype`
    (casts of weights cached while the mode is on, as autocast caches casts of leaf tensors that need a gradient),
    those of CUDA_FP32 ops to float32 (CUDA_FP32_DTYPE: through their dtype argument), of CUDA_PROMOTE ops to
    float32 if one is; calls with an explicit dtype= are left alone. Kept on through the backward,
    as dmd.py / add.py keep autocast on through theirs (gradient checkpointing recomputes under it)."""
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves, tree_map
    from torch.utils.weak import WeakIdKeyDictionary

    class Mode(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.cache = WeakIdKeyDictionary()

        def cast(self, x, to):
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype in (to, torch.float64):
                return x
            if to != torch.float32 and x.is_leaf and x.requires_grad:
                if x not in self.cache:
                    self.cache[x] = x.to(to)
                return self.cache[x]
            return x.to(to)

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            floats = [x.dtype for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor) and
                      x.is_floating_point()]
            if name in CUDA_FP32_DTYPE and kwargs.get("dtype") is None and dtype in floats:
                return func(*args, **kwargs, dtype=torch.float32)   # computed and returned in float32, no copy
            to = dtype if name in CUDA_LOWER else torch.float32 if name in CUDA_FP32 and "dtype" not in kwargs \
                else torch.float32 if name in CUDA_PROMOTE and torch.float32 in floats else None
            if to is not None:
                args, kwargs = tree_map(lambda x: self.cast(x, to), (args, kwargs))
            return func(*args, **kwargs)
    return Mode()


def backward(loss):
    """loss.backward(), straight to the autograd engine: Tensor.backward and torch.autograd.backward pass through
    __torch_function__, whose handler runs with its mode off, so cuda_autocast would be off for the recomputation of
    --gradient-checkpointing."""
    import torch
    from torch.autograd.graph import _engine_run_backward
    _engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True,
                         accumulate_grad=True)


def trace(key):
    """key: (net, mode, batch, res, precision, checkpointing, lora, tiny) -> {'saved', 'extra', 'extra_first',
    'flops', 'params', 'tensors_all', 'trainable', 'tensors'}: bytes (LiveMemory), FLOPs, parameter counts."""
    import torch
    from probe import LiveMemory, flop_counter
    from torch._subclasses.fake_tensor import FakeTensorMode
    net, mode, batch, res, precision, ckpt, lora, tiny = key
    torch.set_num_threads(1)
    with FakeTensorMode():
        m, inputs, call = build(net, tiny, res, batch, lora, torch.float16 if precision == "fp16" else torch.float32)
        for name, p in m.named_parameters():   # train: all weights (LoRA: the adapters); else frozen
            p.requires_grad_(mode == "train" and (not lora or "lora_" in name))
        if ckpt:
            m.enable_gradient_checkpointing()
        m.train(mode != "nograd")
        if mode == "input":
            for x in inputs:
                x.requires_grad_(True)
        live, flops = LiveMemory(), flop_counter()
        live.ignore([*m.parameters(), *m.buffers(), *inputs])
        live.watch_grads(m.parameters())
        amp = cuda_autocast(torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with flops, live, amp:
            with torch.no_grad() if mode == "nograd" else torch.enable_grad():
                out = call(m)
            saved = live.now
            if mode != "nograd":
                backward(out.float().sum())
            del out
        trainable = [p for p in m.parameters() if p.requires_grad]
        return {"saved": saved, "extra": live.peak_without_grads, "extra_first": live.peak,
                "flops": flops.get_total_flops(), "params": sum(p.numel() for p in m.parameters()),
                "tensors_all": sum(1 for _ in m.parameters()), "trainable": sum(p.numel() for p in trainable),
                "tensors": len(trainable)}


def traces(keys, cache_path, workers=2, log=print):
    """{key: trace(key)} for every key, from the cache where it is there, the rest `workers` at a time (one
    single-threaded process per core: the cost is Python's, per operation, whatever the batch)."""
    cache = {}
    if cache_path and os.path.exists(cache_path):
        with open(cache_path) as f:
            cache = {tuple(json.loads(k)): v for k, v in json.load(f).items()}
    todo = [k for k in dict.fromkeys(keys) if k not in cache]
    if todo:
        t0 = time.time()
        log(f"plan: tracing {len(todo)} network calls under fake tensors, {workers} at a time")
        todo.sort(key=cost, reverse=True)   # the longest first
        if workers > 1:
            import multiprocessing
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) \
                    as pool:
                cache |= dict(zip(todo, pool.map(trace, todo)))
        else:
            cache |= {k: trace(k) for k in todo}
        log(f"plan: traced in {time.time() - t0:.0f} s")
        if cache_path:
            os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
            with open(cache_path, "w") as f:
                json.dump({json.dumps(list(k)): v for k, v in cache.items()}, f)
    return {k: cache[k] for k in keys}


def cost(key):
    """A guess of a trace's time, to start the longest first."""
    net, mode, _, _, _, ckpt, lora, tiny = key
    return {"sdxl": 8, "sd15": 4, "vae_dec": 2, "in64": 2}.get(net, 1) * (3 if mode != "nograd" else 1) * \
        (1.5 if ckpt else 1) * (1.2 if lora else 1)


# ----------------------------------------------------------------------------------------------------------
# 2. Compose: the networks each row keeps, its update's phases, the largest micro-batch that fits
# ----------------------------------------------------------------------------------------------------------
def row_spec(row, tiny=False, precision="bf16", batch=None, micro=None):
    """What a scale.ROWS row's command runs: method, teacher, batch and micro-batch (or those given), resolution,
    precision, --gradient-checkpointing and --lora-rank."""
    import scale
    b, m = scale.batch_of(row, tiny)
    teacher = re.search(r"\{(in64|sd15|sdxl)(_student)?\}", row.cmd).group(1)
    lora = re.search(r"--lora-rank (\d+)", row.cmd)
    reg = re.search(r"--reg-loss (\w+)", row.cmd)
    return dict(name=row.name, method="latency" if row.latency else "dmd" if "dmd.py" in row.cmd else "add",
                reg=reg.group(1) if reg else "lpips",
                teacher=teacher, batch=batch or b, micro=micro or batch or m, tiny=tiny, lora=int(lora.group(1)) if lora
                else 0, res=(8 if tiny else 64) if teacher == "in64" else (16 if tiny else 512),
                ckpt="--gradient-checkpointing" in row.cmd, precision="fp16" if row.latency else precision)


def kept_networks(spec):
    """{role: (traced network, trainable, LoRA rank)} of what the command holds in memory."""
    t = spec["teacher"]
    if spec["method"] == "latency":
        return {"student": (t, False, 0)} | ({"vae": ("vae_dec", False, 0)} if t != "in64" else {})
    text = {"text encoder": ("clip_l", False, 0), "vae": ("vae_dec", False, 0)} if t != "in64" else {}
    if spec["method"] == "dmd":   # dmd.py: generator and fake score (trainable), the real score (the teacher)
        return {"generator": (t, True, 0), "fake score": (t, True, 0), "teacher": (t, False, 0)} | text | \
            ({"LPIPS-VGG": ("lpips", False, 0)} if spec["reg"] == "lpips" else {})
    return {"student": (t, True, spec["lora"]), "teacher": (t, False, 0), **text, "DINOv2": ("dino", False, 0),
            "heads": (heads_of(spec), True, 0)} | ({"text encoder 2": ("clip_g", False, 0)} if t == "sdxl" else {})


def heads_of(spec):
    """The discriminator heads' traced name: their projection's width, c_text (SD 1.5: 768, SDXL: 1280; tiny: 16)
    + c_img (DINOv2's 384; tiny: 16)."""
    return f"heads{32 if spec['tiny'] else (1280 if spec['teacher'] == 'sdxl' else 768) + 384}"


def calls(spec):
    """[(network, mode, rows as a multiple of the micro-batch, lora)] of one micro-batch of the update."""
    t, lora = spec["teacher"], spec["lora"]
    if spec["method"] == "latency":
        return [(t, "nograd", 1, 0)] + ([("vae_dec", "nograd", 1, 0)] if t != "in64" else [])
    if spec["method"] == "dmd":   # G on fresh + paired noise (2m); text: the DM batch is 2m, CFG doubles the real score
        n = 2 if t != "in64" else 1   # then LPIPS (--reg-loss lpips): G(z_ref) decoded with its gradient, y_ref without
        lpips = [("vae_dec", "input", 1, 0), ("vae_dec", "nograd", 1, 0)] * (t != "in64") + [("lpips", "input", 1, 0)]
        return [(t, "train", 2, 0), (t, "nograd", 2 * n if t != "in64" else 1, 0), (t, "nograd", n, 0),
                (t, "train", n, 0)] + (lpips if spec["reg"] == "lpips" else [])
    h = heads_of(spec)   # the heads: the adversarial loss (to their input); hinge on 2m rows, R1 ~ one more pass
    return [("vae_enc", "nograd", 1, 0), ("dino", "nograd", 1, 0), (t, "train", 1, lora), ("vae_dec", "input", 1, 0),
            ("dino", "input", 1, 0), (h, "input", 1, 0), (t, "nograd", 1, 0), ("vae_dec", "nograd", 1, 0),
            ("dino", "nograd", 2, 0), (h, "train", 2, 0), (h, "train", 1, 0)]


def trace_key(spec, net, mode, batch, lora=0):
    ckpt = spec["ckpt"] and net in UNETS and mode == "train"   # --gradient-checkpointing: the trained UNet
    return (net, mode, batch, spec["res"], spec["precision"], ckpt, lora, spec["tiny"])


def trace_keys(spec):
    """The traces a row needs: each call at the two batches, each kept network once (its parameters)."""
    keys = [trace_key(spec, net, mode, b, lora) for net, mode, _, lora in calls(spec) for b in BATCHES]
    return keys + [trace_key(spec, net, "train" if train else "nograd", 1, lora)
                   for net, train, lora in kept_networks(spec).values()]


def compose(spec, tr, micro=None):
    """The planned update of a row at micro-batch `micro` (default its own): {'weights', 'grads', 'opt', 'saved'
    (activations one micro-batch keeps for its backward), 'peak', 'flops' (of the whole update), 'phases' (the peak
    of each), 'by_network' (weight bytes)}."""
    m = micro or spec["micro"]
    accum = max(1, spec["batch"] // m) if spec["method"] != "latency" else 1
    bytes_per_weight = 2 if spec["precision"] == "fp16" else 4   # the scripts load fp32 weights (autocast on GPU)
    weights = grads = opt = 0
    by_network, own_grads = {}, {}
    for role, (net, train, lora) in kept_networks(spec).items():
        info = tr[trace_key(spec, net, "train" if train else "nograd", 1, lora)]
        by_network[role] = info["params"] * bytes_per_weight
        weights += by_network[role]
        if train:   # fp32 gradients; AdamW: exp_avg, exp_avg_sq (fp32) and a step per tensor
            own_grads[role] = 4 * info["trainable"]
            opt += 8 * info["trainable"] + 4 * info["tensors"]
    grads = sum(own_grads.values())
    base = weights + opt

    def f(net, mode, k, field, lora=0):
        """A traced quantity of one call, on the line through the two traced batches, at k m rows."""
        v1, v2 = (tr[trace_key(spec, net, mode, b, lora)][field] for b in BATCHES)
        return v1 + (v2 - v1) * (k * m - BATCHES[0]) / (BATCHES[1] - BATCHES[0])

    def trained(role, net, k, lora=0):
        """The call that makes `role`'s gradients: all of them live (a later micro-batch) or made by it (the first,
        after zero_grad(set_to_none=True))."""
        if accum > 1:
            return own_grads[role] + f(net, "train", k, "extra", lora)
        return f(net, "train", k, "extra_first", lora)

    flops = sum(f(net, mode, k, "flops", lora) for net, mode, k, lora in calls(spec))
    t = spec["teacher"]
    if spec["method"] == "latency":   # the UNet, then the VAE decoder, one at a time
        phases, saved = {"sample": max(f(n, mode, k, "extra") for n, mode, k, _ in calls(spec))}, 0.0
        phases = {k: weights + v for k, v in phases.items()}
    elif spec["method"] == "dmd":   # dmd.train(): steps 1-3 (generator), then 5 (fake score)
        (_, _, kg, _), (_, _, kr, _), (_, _, kf, _), (_, _, kt, _) = calls(spec)[:4]
        g_gen, g_fake = own_grads["generator"], own_grads["fake score"]
        waiting = base + g_fake + (g_gen if accum > 1 else 0)
        s_gen = f(t, "train", kg, "saved")
        phases = {"generator backward": base + g_fake + trained("generator", t, kg),
                  "real and fake scores (generator's activations waiting)": waiting + s_gen +
                  max(f(t, "nograd", kr, "extra"), f(t, "nograd", kf, "extra")),
                  "fake-score update": base + g_gen + trained("fake score", t, kt),
                  "optimiser steps": base + grads}
        saved = s_gen
        if spec["reg"] == "lpips":   # G(z_ref) -> VAE decoder -> LPIPS-VGG, live until the backward
            s_dec = f("vae_dec", "input", 1, "saved") if t != "in64" else 0.0
            saved = s_gen + s_dec + f("lpips", "input", 1, "saved")
            phases |= {"regression: decoder and LPIPS (generator's activations waiting)": waiting + s_gen + s_dec +
                       max(f("lpips", "input", 1, "extra"), f("vae_dec", "nograd", 1, "extra") if t != "in64" else 0),
                       "backward through the VAE decoder": waiting + s_gen + (f("vae_dec", "input", 1, "extra")
                                                                              if t != "in64" else 0)}
    else:   # add.train(): data; student -> VAE decoder -> DINOv2 -> heads (live together), the target, backward;
        #     the heads' update: hinge on real and fake features, R1 through a graph of their gradient
        lora, h, g_st = spec["lora"], heads_of(spec), own_grads["student"]
        before = own_grads["heads"] + (g_st if accum > 1 else 0)
        s_st, s_dec, s_dino, s_h = (f(t, "train", 1, "saved", lora), f("vae_dec", "input", 1, "saved"),
                                    f("dino", "input", 1, "saved"), f(h, "input", 1, "saved"))
        saved = s_st + s_dec + s_dino + s_h
        phases = {"data: VAE encoder, c_img": base + before + max(f("vae_enc", "nograd", 1, "extra"),
                                                                  f("dino", "nograd", 1, "extra")),
                  "distillation target (student, decoder, DINOv2, heads activations waiting)": base + before + saved +
                  max(f(t, "nograd", 1, "extra"), f("vae_dec", "nograd", 1, "extra")),
                  "backward through the heads": base + before + s_st + s_dec + s_dino + f(h, "input", 1, "extra"),
                  "backward through DINOv2": base + before + s_st + s_dec + f("dino", "input", 1, "extra"),
                  "backward through the VAE decoder": base + before + s_st + f("vae_dec", "input", 1, "extra"),
                  "backward through the student": base + own_grads["heads"] + trained("student", t, 1, lora),
                  "discriminator update": base + g_st + max(f("dino", "nograd", 2, "extra"),
                                                            trained("heads", h, 2) + f(h, "train", 1, "saved")),
                  "optimiser steps": base + grads}
    peak = max(phases.values())
    return {"weights": weights, "grads": grads, "opt": opt, "saved": saved, "peak": peak, "flops": flops * accum,
            "phases": phases, "by_network": by_network}


def largest_batch(spec, tr, cap=4096):
    """The largest batch that fits BUDGET_GIB in one micro-batch (no accumulation; the peak grows with it: doubling,
    then bisection); 0 if not even 1 fits, `cap` if that does."""
    fits = lambda m: compose(dict(spec, batch=m, micro=m), tr)["peak"] <= BUDGET_GIB * GiB  # noqa: E731
    if not fits(1):
        return 0
    lo = 1
    while lo < cap and fits(min(2 * lo, cap)):
        lo = min(2 * lo, cap)
    hi = min(2 * lo, cap + 1)   # fits(lo), not fits(hi) (or hi past the cap)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def largest_micro_batch(spec, tr):
    """The largest --micro-batch (a divisor of the row's batch) whose update, the rest accumulated, fits BUDGET_GIB;
    0 if none does."""
    return next((d for d in range(spec["batch"], 0, -1) if spec["batch"] % d == 0 and
                 compose(spec, tr, d)["peak"] <= BUDGET_GIB * GiB), 0)


def most_memory(c):
    """What holds most of the planned peak: a network's weights, the gradients, AdamW state, or activations and
    temporaries (at the peak's phase)."""
    parts = {f"weights of the {k}": v for k, v in c["by_network"].items()}
    parts |= {"gradients": c["grads"], "AdamW state": c["opt"],
              "activations": c["peak"] - c["weights"] - c["grads"] - c["opt"]}
    k = max(parts, key=parts.get)
    return f"{k} ({parts[k] / GiB:.1f} GiB)"


def default_rows():
    """Rows planned only (their defaults need a download or more than one GPU to measure): the paper-scale commands as
    a user types them, each script's defaults (dmd.py --teacher sd15: batch 2304 in micro-batches of 32, LPIPS-VGG;
    add.py --teacher sdxl: batch 4, no --gradient-checkpointing)."""
    import scale
    tail = " --output-dir {out}"
    return [scale.Row("dmd-sd15-default", "python dmd.py --teacher {sd15}" + tail, 2304, 0, ("sd15",), tiny=(2, 0)),
            scale.Row("add-sdxl-default", "python add.py --teacher {sdxl}" + tail, 4, 0, ("sdxl", "dino"),
                      tiny=(2, 0))]


COLUMNS = ["row", "batch", "micro_batch", "precision", "checkpointing", "weights_gib", "gradients_gib",
           "optimizer_gib", "activations_gib", "peak_gib", "peak_phase", "tflop_per_update", "s_at_100_mfu",
           "s_at_40_mfu", "fits_80gb", "largest_micro_batch_80gb", "largest_batch_80gb", "most_memory", "status"]


def plan(rows, tiny=False, precision="bf16", work=None, workers=2, log=print):
    """Plan scale.ROWS rows -> records of COLUMNS."""
    work = work or os.path.join(ROOT, "runs", "plan-tiny" if tiny else "plan")
    specs = [row_spec(r, tiny, precision) for r in rows]
    tr = traces([k for s in specs for k in trace_keys(s)], os.path.join(work, "traces.json"), workers, log)
    records = []
    for spec in specs:
        c, train = compose(spec, tr), spec["method"] != "latency"
        gib = lambda v: f"{v / GiB:.3g}"  # noqa: E731
        records.append({
            "row": spec["name"], "batch": spec["batch"], "micro_batch": spec["micro"], "precision": spec["precision"],
            "checkpointing": "yes" if spec["ckpt"] else "no", "weights_gib": gib(c["weights"]),
            "gradients_gib": gib(c["grads"]), "optimizer_gib": gib(c["opt"]),
            "activations_gib": gib(c["saved"]) if train else "", "peak_gib": gib(c["peak"]),
            "peak_phase": max(c["phases"], key=c["phases"].get), "tflop_per_update": f"{c['flops'] / 1e12:.4g}",
            "s_at_100_mfu": f"{c['flops'] / (H100_TFLOPS * 1e12):.3g}",
            "s_at_40_mfu": f"{c['flops'] / (0.4 * H100_TFLOPS * 1e12):.3g}",
            "largest_micro_batch_80gb": largest_micro_batch(spec, tr) if train else "",
            "largest_batch_80gb": largest_batch(spec, tr) if train else "",
            "fits_80gb": "yes" if c["peak"] <= BUDGET_GIB * GiB else "no", "most_memory": most_memory(c),
            "status": "planned (fake tensors)"})
    return records


# ----------------------------------------------------------------------------------------------------------
# 3. Check: the plan beside the real command's own memory (fp32 on the CPU)
# ----------------------------------------------------------------------------------------------------------
CHECKS = [("dmd-in64-b336", True, None), ("dmd-sd15-512", True, None), ("add-sd15-b4", True, None),
          ("add-sdxl-b2", True, None), ("add-sdxl-b2-lora64", True, None), ("dmd-in64-m16", False, 1),
          ("dmd-in64-m16", False, 2)]   # (row, tiny, micro-batch = batch for a mid-size row)
CHECK_COLUMNS = ["row", "config", "batch", "micro_batch", "planned_gib", "traced_gib", "traced_error", "rss_gib",
                 "rss_error", "updates", "status"]


def check(cases=CHECKS, work=None, workers=2, log=print):
    """For each case, the real command (scale.py's, fp32 on this CPU, 2 updates) in a subprocess through
    benchmark/probe.py: the peak of every storage it creates (probe.LiveMemory: the whole-update trace) and its
    peak resident set above the one at its start; beside them the plan of the same sizes. -> records."""
    import dataclasses
    import shlex
    import subprocess

    import scale
    work = work or os.path.join(ROOT, "runs", "plan-check")
    rows = {r.name: r for r in scale.ROWS}
    out = []
    for name, tiny, micro in cases:
        row = rows[name] if micro is None else dataclasses.replace(rows[name], batch=micro, micro=micro,
                                                                   tiny=(micro, micro))
        spec = row_spec(row, tiny, "fp32")
        tr = traces(trace_keys(spec), os.path.join(work, "traces.json"), workers, log)
        planned = compose(spec, tr)["peak"]
        sizes = dict(res=16, disc=16, pairs=4, lat="") if tiny else dict(res=512, disc=224, pairs=2, lat="")
        paths = scale.prepare(os.path.join(work, "tiny" if tiny else "full"), row.needs, tiny, sizes["res"])
        run_dir = os.path.join(work, "runs", f"{name}-m{spec['micro']}")
        cmd = scale.command(row, paths, run_dir, tiny, sizes).replace("--ode-steps 2", "--ode-steps 1") + \
            " --device cpu --overwrite"
        js = run_dir + ".json"
        log(f"plan-check [{name}, micro-batch {spec['micro']}]: {cmd}")
        r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "probe.py"), "--out", js, "--stop-after",
                            "2", "--flops-step", "0", "--live-memory", "--", *shlex.split(cmd)[1:]], cwd=ROOT,
                           capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(workers)))
        rec = json.load(open(js)) if os.path.exists(js) else {}
        ok = r.returncode == 0 and rec.get("stopped")
        traced = (rec.get("live_update_peaks") or [0, 0])[-1]   # the second update, from the end of the first
        rss = (rec.get("peak_bytes") or 0) - (rec.get("rss_start_bytes") or 0)
        err = lambda v: f"{planned / v - 1:+.1%}" if v > 0 else ""  # noqa: E731 - the plan's error against v
        out.append({"row": name, "config": "tiny" if tiny else "full size", "batch": spec["batch"],
                    "micro_batch": spec["micro"], "planned_gib": f"{planned / GiB:.4g}",
                    "traced_gib": f"{traced / GiB:.4g}", "traced_error": err(traced),
                    "rss_gib": f"{rss / GiB:.4g}", "rss_error": err(rss),
                    "updates": len(rec.get("stamps", [])), "status": "ok" if ok else
                    f"error: {(r.stderr.strip().splitlines() or ['?'])[-1][:160]}"})
        log(" ".join(f"{k}={v}" for k, v in out[-1].items()))
    return out
