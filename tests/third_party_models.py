"""Small G and D stand-ins for the three repos sagan_ext.fuse is a drop-in for, with each repo's
call conventions and quirks as its public code has them (widths and depth cut down; layers that
never touch the attention block simplified), and one training step as each repo's trainer takes it.

- heykeetae/Self-Attention-GAN: sagan_models.py (G, D: `out, p1 = self.attn1(out)`, models return
  (out, p1, p2); forward always runs l4, so only image size 64 works), spectral.py (SpectralNorm
  wrapper: weight_bar plus weight_u, weight_v as Parameters with requires_grad=False), trainer.py
  (Adam over filter(requires_grad), hinge or WGAN-GP, fake images not detached in the D step).
- ajbrock/BigGAN-PyTorch: BigGAN.py and BigGANdeep.py (G calls every block as block(h, y): BigGAN
  with y = ys[index] per block, BigGAN-deep with one y; D calls block(h); G.optim and D.optim built
  in the constructor), layers.py (SN layers, ccbn, Attention), train_fns.py (G_D on the
  concatenated batch, toggle_grad, hinge), utils.py (ema holding both models' state-dict tensors).
- POSTECH-CVLab/PyTorch-StudioGAN: src/models/big_resnet.py (G dispatches on
  isinstance(block, ops.SelfAttention), other blocks take (x, affine) and advance a counter; D
  returns a dict), src/utils/ops.py (snconv2d etc.: torch's spectral_norm with eps=1e-6;
  ConditionalBatchNorm2d), src/config.py (Adam with eps=1e-6 over named_parameters),
  src/utils/ema.py (zips parameters() and buffers() of Gen and its deepcopy Gen_ema).
"""
import copy
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from sagan_modules import (BigGANAttention, BigGANSNConv2d, BigGANSNEmbedding, BigGANSNLinear, HeykeetaeSelfAttn,
                           StudioGANSelfAttention)


def gradients(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------------------------
# heykeetae/Self-Attention-GAN


class HeykeetaeSpectralNorm(nn.Module):
    """spectral.py: wraps a layer; one power-iteration step on every forward (eval too, always saved)."""

    def __init__(self, module, name="weight"):
        super().__init__()
        self.module, self.name = module, name
        w = getattr(module, name)
        height = w.shape[0]
        u = nn.Parameter(self._l2normalize(w.data.new(height).normal_(0, 1)), requires_grad=False)
        v = nn.Parameter(self._l2normalize(w.data.new(w.view(height, -1).shape[1]).normal_(0, 1)), requires_grad=False)
        del module._parameters[name]
        module.register_parameter(name + "_u", u)
        module.register_parameter(name + "_v", v)
        module.register_parameter(name + "_bar", nn.Parameter(w.data))

    @staticmethod
    def _l2normalize(v, eps=1e-12):
        return v / (v.norm() + eps)

    def forward(self, *args):
        u, v = getattr(self.module, self.name + "_u"), getattr(self.module, self.name + "_v")
        w = getattr(self.module, self.name + "_bar")
        height = w.data.shape[0]
        v.data = self._l2normalize(torch.mv(torch.t(w.view(height, -1).data), u.data))
        u.data = self._l2normalize(torch.mv(w.view(height, -1).data, v.data))
        sigma = u.dot(w.view(height, -1).mv(v))
        setattr(self.module, self.name, w / sigma.expand_as(w))
        return self.module.forward(*args)


class HeykeetaeGenerator(nn.Module):
    """sagan_models.Generator at image size 64, conv_dim 8 (theirs: 64): attn1 on conv_dim*2 channels
    at 16 x 16, attn2 on conv_dim at 32 x 32."""

    def __init__(self, z_dim=16, conv_dim=8):
        super().__init__()
        dims = [conv_dim * 8, conv_dim * 4, conv_dim * 2, conv_dim]

        def up(i, o, *args):
            conv = HeykeetaeSpectralNorm(nn.ConvTranspose2d(i, o, 4, *args))
            return nn.Sequential(conv, nn.BatchNorm2d(o), nn.ReLU())
        self.l4 = up(dims[2], dims[3], 2, 1)
        self.l1, self.l2, self.l3 = up(z_dim, dims[0]), up(dims[0], dims[1], 2, 1), up(dims[1], dims[2], 2, 1)
        self.last = nn.Sequential(nn.ConvTranspose2d(dims[3], 3, 4, 2, 1), nn.Tanh())
        self.attn1, self.attn2 = HeykeetaeSelfAttn(dims[2], "relu"), HeykeetaeSelfAttn(dims[3], "relu")

    def forward(self, z):
        out = self.l3(self.l2(self.l1(z.view(z.size(0), z.size(1), 1, 1))))
        out, p1 = self.attn1(out)
        out = self.l4(out)
        out, p2 = self.attn2(out)
        return self.last(out), p1, p2


class HeykeetaeDiscriminator(nn.Module):
    """sagan_models.Discriminator at image size 64, conv_dim 8: attn1 on conv_dim*4 channels at 8 x 8,
    attn2 on conv_dim*8 at 4 x 4; returns (out.squeeze(), p1, p2)."""

    def __init__(self, conv_dim=8):
        super().__init__()

        def down(i, o):
            return nn.Sequential(HeykeetaeSpectralNorm(nn.Conv2d(i, o, 4, 2, 1)), nn.LeakyReLU(0.1))
        self.l4 = down(conv_dim * 4, conv_dim * 8)
        self.l1, self.l2, self.l3 = down(3, conv_dim), down(conv_dim, conv_dim * 2), down(conv_dim * 2, conv_dim * 4)
        self.last = nn.Sequential(nn.Conv2d(conv_dim * 8, 1, 4))
        self.attn1, self.attn2 = HeykeetaeSelfAttn(conv_dim * 4, "relu"), HeykeetaeSelfAttn(conv_dim * 8, "relu")

    def forward(self, x):
        out = self.l3(self.l2(self.l1(x)))
        out, p1 = self.attn1(out)
        out = self.l4(out)
        out, p2 = self.attn2(out)
        return self.last(out).squeeze(), p1, p2


def heykeetae_models(seed):
    torch.manual_seed(seed)
    G, D = HeykeetaeGenerator().double(), HeykeetaeDiscriminator().double()
    def adam(model, lr):
        return torch.optim.Adam(filter(lambda p: p.requires_grad, model.parameters()), lr, [0.0, 0.9])
    return SimpleNamespace(G=G, D=D, g_optimizer=adam(G, 1e-3), d_optimizer=adam(D, 4e-3))


def heykeetae_step(t, real, z, alpha, adv_loss):
    """trainer.Trainer.train, one iteration; returns the gradients of each backward."""
    record = {}

    def reset_grad():
        t.d_optimizer.zero_grad(), t.g_optimizer.zero_grad()
    d_out_real, dr1, dr2 = t.D(real)
    d_loss_real = torch.relu(1.0 - d_out_real).mean() if adv_loss == "hinge" else -d_out_real.mean()
    fake_images, gf1, gf2 = t.G(z[0])
    d_out_fake, df1, df2 = t.D(fake_images)
    d_loss_fake = torch.relu(1.0 + d_out_fake).mean() if adv_loss == "hinge" else d_out_fake.mean()
    reset_grad()
    (d_loss_real + d_loss_fake).backward()
    record["d"] = {**gradients(t.D), **{"G." + n: g for n, g in gradients(t.G).items()}}
    t.d_optimizer.step()
    if adv_loss == "wgan-gp":
        interpolated = (alpha * real.data + (1 - alpha) * fake_images.data).requires_grad_()
        out, _, _ = t.D(interpolated)
        grad = torch.autograd.grad(out, interpolated, torch.ones(out.size(), dtype=out.dtype), retain_graph=True,
                                   create_graph=True, only_inputs=True)[0]
        d_loss_gp = torch.mean((torch.sqrt(torch.sum(grad.view(grad.size(0), -1) ** 2, dim=1)) - 1) ** 2)
        reset_grad()
        (10 * d_loss_gp).backward()
        record["gp"] = gradients(t.D)
        t.d_optimizer.step()
    fake_images, _, _ = t.G(z[1])
    g_out_fake, _, _ = t.D(fake_images)
    reset_grad()
    (-g_out_fake.mean()).backward()
    record["g"] = gradients(t.G)
    t.g_optimizer.step()
    return record


# ----------------------------------------------------------------------------------------------
# ajbrock/BigGAN-PyTorch (BigGAN and BigGAN-deep)


class BigGANccbn(nn.Module):
    """layers.ccbn: batch norm with class-conditional gain 1 + W_g y and bias W_b y."""

    def __init__(self, input_size, output_size, eps=1e-5):
        super().__init__()
        self.gain = nn.Linear(input_size, output_size, bias=False)
        self.bias = nn.Linear(input_size, output_size, bias=False)
        self.eps = eps
        self.register_buffer("stored_mean", torch.zeros(output_size))
        self.register_buffer("stored_var", torch.ones(output_size))

    def forward(self, x, y):
        gain = (1 + self.gain(y)).view(y.size(0), -1, 1, 1)
        bias = self.bias(y).view(y.size(0), -1, 1, 1)
        out = F.batch_norm(x, self.stored_mean, self.stored_var, None, None, self.training, 0.1, self.eps)
        return out * gain + bias


class BigGANGBlock(nn.Module):
    """layers.GBlock (BigGAN-deep's GBlock adds a bottleneck; its call is the same): forward(x, y)."""

    def __init__(self, in_channels, out_channels, y_dim):
        super().__init__()
        self.conv1 = BigGANSNConv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = BigGANSNConv2d(out_channels, out_channels, 3, padding=1)
        self.conv_sc = BigGANSNConv2d(in_channels, out_channels, 1)
        self.bn1, self.bn2 = BigGANccbn(y_dim, in_channels), BigGANccbn(y_dim, out_channels)

    def forward(self, x, y):
        h = F.interpolate(torch.relu(self.bn1(x, y)), scale_factor=2)
        h = self.conv2(torch.relu(self.bn2(self.conv1(h), y)))
        return h + self.conv_sc(F.interpolate(x, scale_factor=2))


class BigGANGenerator(nn.Module):
    """BigGAN.Generator (hier: z split into chunks, ys[i] = cat(y, chunk i + 1), block(h, ys[index]))
    or, deep=True, BigGANdeep.Generator (z = cat(y, z), one y, block(h, y)); the Attention shares a
    blocklist with the GBlock before it; G.optim built at the end of the constructor."""

    def __init__(self, ch=16, dim_z=12, shared_dim=6, n_classes=5, deep=False, no_optim=False):
        super().__init__()
        self.deep, self.chunk = deep, dim_z // 3
        y_dim = shared_dim + (dim_z if deep else self.chunk)
        self.shared = nn.Embedding(n_classes, shared_dim)
        self.linear = BigGANSNLinear(y_dim if deep else self.chunk, 2 * ch * 4 * 4)
        self.blocks = nn.ModuleList([nn.ModuleList([BigGANGBlock(2 * ch, ch, y_dim)]),
                                     nn.ModuleList([BigGANGBlock(ch, ch, y_dim), BigGANAttention(ch, BigGANSNConv2d)])])
        self.output_layer = nn.Sequential(nn.BatchNorm2d(ch), nn.ReLU(), BigGANSNConv2d(ch, 3, 3, padding=1))
        if not no_optim:
            self.optim = torch.optim.Adam(params=self.parameters(), lr=5e-3, betas=(0.0, 0.999), eps=1e-8)

    def forward(self, z, y):
        if self.deep:
            z = torch.cat([y, z], 1)
            ys = [z] * len(self.blocks)
        else:
            zs = torch.split(z, self.chunk, 1)
            z, ys = zs[0], [torch.cat([y, item], 1) for item in zs[1:]]
        h = self.linear(z).view(z.size(0), -1, 4, 4)
        for index, blocklist in enumerate(self.blocks):
            for block in blocklist:
                h = block(h, ys[index])
        return torch.tanh(self.output_layer(h))


class BigGANDBlock(nn.Module):
    def __init__(self, in_channels, out_channels, preactivation, downsample):
        super().__init__()
        self.preactivation, self.downsample = preactivation, downsample
        self.conv1 = BigGANSNConv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = BigGANSNConv2d(out_channels, out_channels, 3, padding=1)
        self.conv_sc = BigGANSNConv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv2(torch.relu(self.conv1(torch.relu(x) if self.preactivation else x)))
        if self.downsample:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        return h + self.conv_sc(x)


class BigGANDiscriminator(nn.Module):
    """BigGAN.Discriminator / BigGANdeep.Discriminator: block(h) (Attention too), sum pooling,
    projection onto SNEmbedding(y); D.optim built in the constructor."""

    def __init__(self, ch=16, n_classes=5):
        super().__init__()
        attention = BigGANAttention(ch, BigGANSNConv2d)
        self.blocks = nn.ModuleList([nn.ModuleList([BigGANDBlock(3, ch, False, True)]),
                                     nn.ModuleList([BigGANDBlock(ch, ch, True, True), attention]),
                                     nn.ModuleList([BigGANDBlock(ch, 2 * ch, True, False)])])
        self.linear = BigGANSNLinear(2 * ch, 1)
        self.embed = BigGANSNEmbedding(n_classes, 2 * ch)
        self.optim = torch.optim.Adam(params=self.parameters(), lr=2e-2, betas=(0.0, 0.999), eps=1e-8)

    def forward(self, x, y=None):
        h = x
        for blocklist in self.blocks:
            for block in blocklist:
                h = block(h)
        h = torch.sum(torch.relu(h), [2, 3])
        return self.linear(h) + torch.sum(self.embed(y) * h, 1, keepdim=True)


class BigGANema:
    """utils.ema: holds both models' state-dict tensors from its construction on."""

    def __init__(self, source, target, decay=0.9):
        self.source_dict, self.target_dict, self.decay = source.state_dict(), target.state_dict(), decay
        with torch.no_grad():
            for key in self.source_dict:
                self.target_dict[key].data.copy_(self.source_dict[key].data)

    def update(self):
        with torch.no_grad():
            for key in self.source_dict:
                self.target_dict[key].data.copy_(self.target_dict[key].data * self.decay
                                                 + self.source_dict[key].data * (1 - self.decay))


def biggan_models(seed, deep):
    torch.manual_seed(seed)
    G, D = BigGANGenerator(deep=deep).double(), BigGANDiscriminator().double()
    G_ema = BigGANGenerator(deep=deep, no_optim=True).double()
    return SimpleNamespace(G=G, D=D, G_ema=G_ema, ema=BigGANema(G, G_ema))


def _toggle_grad(model, on):
    for param in model.parameters():
        param.requires_grad = on


def biggan_step(t, x, y, z, gy):
    """train_fns.GAN_training_function with one D step and one G step, no accumulation."""
    record = {}
    t.G.optim.zero_grad(), t.D.optim.zero_grad()
    _toggle_grad(t.D, True), _toggle_grad(t.G, False)
    with torch.no_grad():  # G_D(train_G=False)
        G_z = t.G(z[0], t.G.shared(gy[0]))
    D_out = t.D(torch.cat([G_z, x], 0), torch.cat([gy[0], y], 0))
    D_fake, D_real = torch.split(D_out, [G_z.shape[0], x.shape[0]])
    (torch.mean(F.relu(1. - D_real)) + torch.mean(F.relu(1. + D_fake))).backward()
    record["d"] = gradients(t.D)
    t.D.optim.step()
    _toggle_grad(t.D, False), _toggle_grad(t.G, True)
    t.G.optim.zero_grad()
    D_fake = t.D(t.G(z[1], t.G.shared(gy[1])), gy[1])
    (-torch.mean(D_fake)).backward()
    record["g"] = gradients(t.G)
    t.G.optim.step()
    t.ema.update()
    return record


# ----------------------------------------------------------------------------------------------
# POSTECH-CVLab/PyTorch-StudioGAN


def studiogan_modules(apply_sn):
    """config.py's MODULES: ops.snconv2d etc. (torch's spectral_norm, eps=1e-6) or plain layers."""
    def sn(layer):
        return torch.nn.utils.spectral_norm(layer, eps=1e-6) if apply_sn else layer

    def conv2d(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        return sn(nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias))

    def linear(in_features, out_features, bias=True):
        return sn(nn.Linear(in_features, out_features, bias=bias))
    return SimpleNamespace(g_conv2d=conv2d, d_conv2d=conv2d, g_linear=linear, d_linear=linear,
                           d_embedding=lambda n, d: sn(nn.Embedding(n, d)), g_act_fn=nn.ReLU(), d_act_fn=nn.ReLU())


class StudioGANConditionalBatchNorm2d(nn.Module):
    def __init__(self, in_features, out_features, MODULES):  # noqa: N803
        super().__init__()
        self.bn = nn.BatchNorm2d(out_features, eps=1e-4, momentum=0.1, affine=False)
        self.gain = MODULES.g_linear(in_features, out_features, bias=False)
        self.bias = MODULES.g_linear(in_features, out_features, bias=False)

    def forward(self, x, y):
        return self.bn(x) * (1 + self.gain(y)).view(y.size(0), -1, 1, 1) + self.bias(y).view(y.size(0), -1, 1, 1)


class StudioGANGenBlock(nn.Module):
    def __init__(self, in_channels, out_channels, affine_input_dim, MODULES):  # noqa: N803
        super().__init__()
        self.bn1 = StudioGANConditionalBatchNorm2d(affine_input_dim, in_channels, MODULES)
        self.bn2 = StudioGANConditionalBatchNorm2d(affine_input_dim, out_channels, MODULES)
        self.activation = MODULES.g_act_fn
        self.conv2d0 = MODULES.g_conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
        self.conv2d1 = MODULES.g_conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.conv2d2 = MODULES.g_conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x, affine):
        h = self.conv2d1(F.interpolate(self.activation(self.bn1(x, affine)), scale_factor=2, mode="nearest"))
        h = self.conv2d2(self.activation(self.bn2(h, affine)))
        return h + self.conv2d0(F.interpolate(x, scale_factor=2, mode="nearest"))


class StudioGANGenerator(nn.Module):
    """big_resnet.Generator: z split into chunks, affines = cat(shared(label), chunk); the blocks
    loop dispatches on isinstance(block, SelfAttention): block(act), else block(act, affines[counter])."""

    def __init__(self, MODULES, ch=16, z_dim=12, shared_dim=6, num_classes=5):  # noqa: N803
        super().__init__()
        self.chunk_size = z_dim // 3
        self.in_dims, self.bottom = [2 * ch, ch], 4
        self.linear0 = MODULES.g_linear(self.chunk_size, self.in_dims[0] * 4 * 4, bias=True)
        self.shared = nn.Embedding(num_classes, shared_dim)
        affine_dim = self.chunk_size + shared_dim
        self.blocks = nn.ModuleList([nn.ModuleList([StudioGANGenBlock(2 * ch, ch, affine_dim, MODULES)]),
                                     nn.ModuleList([StudioGANSelfAttention(ch, is_generator=True, MODULES=MODULES)]),
                                     nn.ModuleList([StudioGANGenBlock(ch, ch, affine_dim, MODULES)])])
        self.bn4 = nn.BatchNorm2d(ch, eps=1e-4, momentum=0.1)
        self.activation = MODULES.g_act_fn
        self.conv2d5 = MODULES.g_conv2d(ch, 3, kernel_size=3, stride=1, padding=1)
        self.tanh = nn.Tanh()

    def forward(self, z, label, shared_label=None, eval=False):
        zs = torch.split(z, self.chunk_size, 1)
        shared_label = self.shared(label) if shared_label is None else shared_label
        affines = [torch.cat([shared_label, item], 1) for item in zs[1:]]
        act = self.linear0(zs[0]).view(-1, self.in_dims[0], self.bottom, self.bottom)
        counter = 0
        for blocklist in self.blocks:
            for block in blocklist:
                if isinstance(block, StudioGANSelfAttention):
                    act = block(act)
                else:
                    act = block(act, affines[counter])
                    counter += 1
        return self.tanh(self.conv2d5(self.activation(self.bn4(act))))


class StudioGANDiscBlock(nn.Module):
    def __init__(self, in_channels, out_channels, MODULES, first, downsample=True):  # noqa: N803
        super().__init__()
        self.first, self.downsample, self.activation = first, downsample, MODULES.d_act_fn
        self.conv2d0 = MODULES.d_conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
        self.conv2d1 = MODULES.d_conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.conv2d2 = MODULES.d_conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):  # DiscOptBlock (first) and DiscBlock
        h = self.conv2d2(self.activation(self.conv2d1(x if self.first else self.activation(x))))
        if self.downsample:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        return h + self.conv2d0(x)


class StudioGANDiscriminator(nn.Module):
    """big_resnet.Discriminator with PD (projection) conditioning: block(h) for every block, returns a dict."""

    def __init__(self, MODULES, ch=16, num_classes=5):  # noqa: N803
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleList([StudioGANDiscBlock(3, ch, MODULES, True)]),
                                     nn.ModuleList([StudioGANDiscBlock(ch, ch, MODULES, False)]),
                                     nn.ModuleList([StudioGANSelfAttention(ch, is_generator=False, MODULES=MODULES)]),
                                     nn.ModuleList([StudioGANDiscBlock(ch, 2 * ch, MODULES, False, downsample=False)])])
        self.activation = MODULES.d_act_fn
        self.linear1 = MODULES.d_linear(2 * ch, 1, bias=True)
        self.embedding = MODULES.d_embedding(num_classes, 2 * ch)

    def forward(self, x, label, eval=False, adc_fake=False):
        h = x
        for blocklist in self.blocks:
            for block in blocklist:
                h = block(h)
        h = torch.sum(self.activation(h), dim=[2, 3])
        adv_output = torch.squeeze(self.linear1(h)) + torch.sum(torch.mul(self.embedding(label), h), 1)
        return {"h": h, "adv_output": adv_output}


class StudioGANEma:
    """src/utils/ema.py Ema: zips parameters() and buffers() of the source and its deepcopy."""

    def __init__(self, source, target, decay=0.9):
        self.source, self.target, self.decay = source, target, decay

    def update(self):
        with torch.no_grad():
            for p_ema, p in zip(self.target.parameters(), self.source.parameters()):
                p_ema.copy_(p.lerp(p_ema, self.decay))
            for (name, b_ema), (_, b) in zip(self.target.named_buffers(), self.source.named_buffers()):
                b_ema.copy_(b if "num_batches_tracked" in name else b.lerp(b_ema, self.decay))


def studiogan_models(seed, apply_sn):
    torch.manual_seed(seed)
    modules = studiogan_modules(apply_sn)
    Gen, Dis = StudioGANGenerator(modules).double(), StudioGANDiscriminator(modules).double()
    Gen_ema = copy.deepcopy(Gen)
    adam = lambda m, lr: torch.optim.Adam([p for _, p in m.named_parameters()], lr=lr, betas=[0.0, 0.999],  # noqa: E731
                                          weight_decay=0.0, eps=1e-6)
    return SimpleNamespace(Gen=Gen, Dis=Dis, Gen_ema=Gen_ema, ema=StudioGANEma(Gen, Gen_ema),
                           g_optimizer=adam(Gen, 2e-3), d_optimizer=adam(Dis, 8e-3))


def studiogan_step(t, real_images, real_labels, zs, fake_labels):
    """worker.train_discriminator and train_generator (hinge losses d_hinge and g_hinge), then ema.update."""
    record = {}
    _toggle_grad(t.Gen, False), _toggle_grad(t.Dis, True)
    t.d_optimizer.zero_grad()
    fake_images = t.Gen(zs[0], fake_labels[0])
    real_dict, fake_dict = t.Dis(real_images, real_labels), t.Dis(fake_images, fake_labels[0])
    (torch.mean(F.relu(1. - real_dict["adv_output"])) + torch.mean(F.relu(1. + fake_dict["adv_output"]))).backward()
    record["d"] = gradients(t.Dis)
    t.d_optimizer.step()
    _toggle_grad(t.Dis, False), _toggle_grad(t.Gen, True)
    t.g_optimizer.zero_grad()
    (-torch.mean(t.Dis(t.Gen(zs[1], fake_labels[1]), fake_labels[1])["adv_output"])).backward()
    record["g"] = gradients(t.Gen)
    t.g_optimizer.step()
    t.ema.update()
    return record
