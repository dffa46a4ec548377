// Live preview: projects 4-channel diffusion latents to RGB with the family's linear map.
// The CPU reference is `easel_engine::pipeline::preview::latent_to_rgb`; both must agree.

struct Params {
    // Column c holds latent channel c's contribution to (r, g, b); w is unused.
    // Column-major like WGSL matrices, so `proj * latent` is the per-pixel projection.
    proj: mat4x4<f32>,
    // xyz: per-channel bias; w unused (vec4 keeps the uniform layout free of padding rules).
    bias: vec4<f32>,
    // x: 1 when the target format is sRGB, so the hardware's encode must be undone; yzw unused.
    flags: vec4<u32>,
};

@group(0) @binding(0) var<uniform> params: Params;
// Channels 0..3 of the latent in r, g, b, a. Rgba32Float is not filterable everywhere,
// hence textureLoad and bilinear interpolation by hand.
@group(0) @binding(1) var latent: texture_2d<f32>;

struct VsOut {
    @builtin(position) position: vec4<f32>,
    // (0, 0) at the top-left corner of the viewport, (1, 1) at the bottom-right.
    @location(0) uv: vec2<f32>,
};

// One triangle covering the whole viewport: no vertex buffer needed.
@vertex
fn vs_main(@builtin(vertex_index) index: u32) -> VsOut {
    let x = f32((index << 1u) & 2u);
    let y = f32(index & 2u);
    var out: VsOut;
    out.position = vec4<f32>(x * 2.0 - 1.0, 1.0 - y * 2.0, 0.0, 1.0);
    out.uv = vec2<f32>(x, y);
    return out;
}

fn load(p: vec2<i32>, size: vec2<i32>) -> vec4<f32> {
    return textureLoad(latent, clamp(p, vec2<i32>(0), size - vec2<i32>(1)), 0);
}

// sRGB EOTF (gamma -> linear), the inverse of what an sRGB target applies on write.
fn linear_from_gamma(srgb: vec3<f32>) -> vec3<f32> {
    let lower = srgb / 12.92;
    let higher = pow((srgb + 0.055) / 1.055, vec3<f32>(2.4));
    return select(higher, lower, srgb < vec3<f32>(0.04045));
}

@fragment
fn fs_main(in: VsOut) -> @location(0) vec4<f32> {
    let size = vec2<i32>(textureDimensions(latent));
    // Texel centres sit at half-integers, so at the latent's own resolution every output
    // pixel lands on exactly one texel and the result equals the CPU reference.
    let p = in.uv * vec2<f32>(size) - 0.5;
    let p0 = floor(p);
    let f = p - p0;
    let i0 = vec2<i32>(p0);
    // Interpolating latents before projecting equals projecting first (the map is linear);
    // only the clamp below is non-linear, and it belongs after interpolation.
    let top = mix(load(i0, size), load(i0 + vec2<i32>(1, 0), size), f.x);
    let bottom = mix(load(i0 + vec2<i32>(0, 1), size), load(i0 + vec2<i32>(1, 1), size), f.x);
    let value = mix(top, bottom, f.y);

    let v = params.bias.xyz + (params.proj * value).xyz;
    var rgb = clamp((v + 1.0) * 0.5, vec3<f32>(0.0), vec3<f32>(1.0));
    // egui paints gamma-space values; an sRGB target would encode ours a second time.
    if params.flags.x != 0u {
        rgb = linear_from_gamma(rgb);
    }
    return vec4<f32>(rgb, 1.0);
}
