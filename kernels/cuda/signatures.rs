//! The kernels' entry points as the .cu files declare them, read by both build scripts:
//! kernels/build.rs generates the typed launchers of the `cuda` feature from them
//! ([`launchers`]), kernels/emu/build.rs the emulator's declarations ([`emulator_table`]).
//! So the argument list a launch pushes is the one the .cu declares, checked by rustc, and the
//! emulator calls the same list; a SAFETY comment no longer carries that.
//!
//! It reads only the small C the kernels use: `HERD_INSTANTIATE(NAME, (PARAMS), CALL)` (one
//! entry point per storage type, `T` = float | bf16) and `extern "C" __global__ void NAME(PARAMS)`;
//! a parameter is `[const] TYPE [*] NAME` with TYPE one of T, float, int, int64_t, uint64_t,
//! size_t. Anything else is an error naming the file and the parameter.

use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    /// The storage type the entry point is instantiated for.
    T,
    F32,
    I32,
    I64,
    U64,
    Usize,
}

impl Elem {
    fn from_c(word: &str) -> Option<Elem> {
        Some(match word {
            "T" => Elem::T,
            "float" => Elem::F32,
            "int" => Elem::I32,
            "int64_t" => Elem::I64,
            "uint64_t" => Elem::U64,
            "size_t" => Elem::Usize,
            _ => return None,
        })
    }

    pub fn rust(self) -> &'static str {
        match self {
            Elem::T => "T",
            Elem::F32 => "f32",
            Elem::I32 => "i32",
            Elem::I64 => "i64",
            Elem::U64 => "u64",
            Elem::Usize => "usize",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    /// `const E*`: read by the kernel.
    In(Elem),
    /// `E*`: written (maybe also read) by the kernel.
    Out(Elem),
    /// `E`: by value.
    Value(Elem),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    pub name: String,
    pub ty: Ty,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryPoint {
    /// The C name; an instantiated one has `_f32` and `_bf16` appended.
    pub name: String,
    pub per_dtype: bool,
    /// The .cu file's stem: its PTX module.
    pub file: String,
    pub params: Vec<Param>,
}

/// Every entry point of one .cu file (`file` is its stem, for error messages and the module).
pub fn parse(file: &str, src: &str) -> Result<Vec<EntryPoint>, String> {
    let src = strip_comments(src);
    let mut out = Vec::new();
    let mut at = 0;
    while let Some((pos, per_dtype)) = next_entry(&src[at..]) {
        let rest = &src[at + pos..];
        let (name, params, used) = if per_dtype {
            let body = &rest["HERD_INSTANTIATE(".len()..];
            let comma = body
                .find(',')
                .ok_or_else(|| format!("cuda/{file}.cu: HERD_INSTANTIATE without a comma"))?;
            let name = body[..comma].trim().to_string();
            let (params, len) = parenthesized(&body[comma + 1..], file, &name)?;
            (name, params, "HERD_INSTANTIATE(".len() + comma + 1 + len)
        } else {
            let body = &rest[GLOBAL.len()..];
            let open = body
                .find('(')
                .ok_or_else(|| format!("cuda/{file}.cu: kernel without parameters"))?;
            let name = body[..open].trim().to_string();
            let (params, len) = parenthesized(&body[open..], file, &name)?;
            (name, params, GLOBAL.len() + open + len)
        };
        let params = params
            .split(',')
            .map(|p| param(p, per_dtype).map_err(|e| format!("cuda/{file}.cu: {name}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        out.push(EntryPoint {
            name,
            per_dtype,
            file: file.to_string(),
            params,
        });
        at += pos + used;
    }
    Ok(out)
}

const GLOBAL: &str = "extern \"C\" __global__ void";

/// The offset of the next entry point and whether it is instantiated per dtype.
fn next_entry(s: &str) -> Option<(usize, bool)> {
    let a = s.find("HERD_INSTANTIATE(").map(|i| (i, true));
    let b = s.find(GLOBAL).map(|i| (i, false));
    match (a, b) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// `s` starts (after blanks) with a balanced `( .. )`: its inside and the length consumed.
fn parenthesized<'a>(s: &'a str, file: &str, name: &str) -> Result<(&'a str, usize), String> {
    let open = s
        .find('(')
        .filter(|&i| s[..i].trim().is_empty())
        .ok_or_else(|| format!("cuda/{file}.cu: {name}: expected `(` and the parameters"))?;
    let mut depth = 0;
    for (i, c) in s[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Ok((&s[open + 1..open + i], open + i + 1));
                }
            }
            _ => {}
        }
    }
    Err(format!("cuda/{file}.cu: {name}: unbalanced parentheses"))
}

fn param(text: &str, per_dtype: bool) -> Result<Param, String> {
    let spaced = text.replace('*', " * ");
    let mut words: Vec<&str> = spaced.split_whitespace().collect();
    let unsupported = || format!("unsupported parameter `{}`", text.trim());
    let is_const = words.first() == Some(&"const");
    if is_const {
        words.remove(0);
    }
    let (ty, name) = match words.as_slice() {
        [ty, "*", name] => (*ty, (*name, true)),
        [ty, name] => (*ty, (*name, false)),
        _ => return Err(unsupported()),
    };
    let elem = Elem::from_c(ty).ok_or_else(unsupported)?;
    if elem == Elem::T && !per_dtype {
        return Err(format!("`{}`: T outside HERD_INSTANTIATE", text.trim()));
    }
    let ty = match (name.1, is_const) {
        (true, true) => Ty::In(elem),
        (true, false) => Ty::Out(elem),
        (false, _) if elem == Elem::T => return Err(unsupported()),
        (false, _) => Ty::Value(elem),
    };
    Ok(Param {
        name: name.0.to_string(),
        ty,
    })
}

fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    loop {
        let line = rest.find("//");
        let block = rest.find("/*");
        let (start, end_marker) = match (line, block) {
            (Some(l), Some(b)) if b < l => (b, "*/"),
            (Some(l), _) => (l, "\n"),
            (None, Some(b)) => (b, "*/"),
            (None, None) => break,
        };
        out.push_str(&rest[..start]);
        rest = &rest[start + 2..];
        match rest.find(end_marker) {
            Some(e) => rest = &rest[e + end_marker.len()..],
            None => rest = "",
        }
        out.push(if end_marker == "\n" { '\n' } else { ' ' });
    }
    out.push_str(rest);
    out
}

/// The emulator's table (kernels/emu/src/lib.rs): a `per_dtype!` invocation for the
/// instantiated entry points and an `extern "C"` block for the rest.
pub fn emulator_table(entries: &[EntryPoint]) -> String {
    let mut s = String::from(
        "// Generated by kernels/emu/build.rs from kernels/cuda/*.cu.\nper_dtype! {\n",
    );
    for e in entries.iter().filter(|e| e.per_dtype) {
        let field = e.name.trim_start_matches("herd_");
        let _ = writeln!(
            s,
            "    {field}: {n}_f32 / {n}_bf16 ({});",
            ffi_params(e),
            n = e.name
        );
    }
    s.push_str("}\n\nextern \"C\" {\n");
    for e in entries.iter().filter(|e| !e.per_dtype) {
        let _ = writeln!(
            s,
            "    /// cuda/{}.cu\n    pub fn {}({});",
            e.file,
            e.name,
            ffi_params(e)
        );
    }
    s.push_str("}\n");
    s
}

fn ffi_params(e: &EntryPoint) -> String {
    let list: Vec<String> = e
        .params
        .iter()
        .map(|p| {
            let ty = match p.ty {
                Ty::In(t) => format!("*const {}", t.rust()),
                Ty::Out(t) => format!("*mut {}", t.rust()),
                Ty::Value(t) => t.rust().to_string(),
            };
            format!("{}: {ty}", rust_name(&p.name))
        })
        .collect();
    list.join(", ")
}

/// The C name (C already made them distinct: `s` and `S` both occur, so no case folding; the
/// generated code allows non-snake-case), `_`-suffixed where it would be a Rust keyword or
/// shadow a launcher's own names.
fn rust_name(c: &str) -> String {
    const TAKEN: &[&str] = &[
        "dev", "grid", "b", "k", "as", "fn", "in", "impl", "let", "loop", "match", "mod", "move",
        "ref", "self", "type", "use", "where",
    ];
    if TAKEN.contains(&c) {
        format!("{c}_")
    } else {
        c.to_string()
    }
}

/// The `cuda` feature's launchers (included by kernels/src/cuda.rs): the PTX modules, one per
/// .cu file, and per entry point an `unsafe fn NAME` taking the device, the grid and the
/// parameters with their .cu types (buffers as [`In`]/[`Out`], scalars by value).
pub fn launchers(files: &[String], entries: &[EntryPoint]) -> String {
    let mut s = String::from("// Generated by kernels/build.rs from kernels/cuda/*.cu.\n");
    for f in files {
        let _ = writeln!(
            s,
            "pub(crate) const {}: Module = Module {{ name: \"herd_{f}\", ptx: include_str!(concat!(env!(\"OUT_DIR\"), \"/{f}.ptx\")) }};",
            f.to_uppercase()
        );
    }
    for e in entries {
        let generic = if e.per_dtype { "<T: WithDType>" } else { "" };
        let mut params = String::new();
        let mut pushes = String::new();
        for p in &e.params {
            let n = rust_name(&p.name);
            let (ty, push) = match p.ty {
                Ty::In(t) => (
                    format!("&impl In<{}>", t.rust()),
                    format!("{n}.push(&mut b);"),
                ),
                Ty::Out(t) => (
                    format!("&mut impl Out<{}>", t.rust()),
                    format!("{n}.push(&mut b);"),
                ),
                Ty::Value(t) => (t.rust().to_string(), format!("b.arg(&{n});")),
            };
            let _ = write!(params, ", {n}: {ty}");
            let _ = write!(pushes, "\n    {push}");
        }
        let lookup = if e.per_dtype {
            format!(
                "func(dev, &{}, \"{}\", T::DTYPE)?",
                e.file.to_uppercase(),
                e.name
            )
        } else {
            format!(
                "plain_func(dev, &{}, \"{}\")?",
                e.file.to_uppercase(),
                e.name
            )
        };
        let _ = write!(
            s,
            "\n/// Launches `{name}` (cuda/{file}.cu) on the device's stream.\n\
             ///\n/// # Safety\n/// The buffers must hold what the kernel reads and writes under `grid`.\n\
             #[allow(clippy::too_many_arguments, dead_code, non_snake_case)]\n\
             pub(crate) unsafe fn {name}{generic}(dev: &CudaDevice, grid: LaunchConfig{params}) -> Result<()> {{\n    \
             // No work: CUDA refuses an empty grid (the host emulator would just run nothing).\n    \
             if grid.grid_dim.0 == 0 {{\n        return Ok(());\n    }}\n    \
             let k = {lookup};\n    let mut b = k.builder();{pushes}\n    \
             // SAFETY: the arguments are the .cu's parameters, in order and typed (this file is generated from it).\n    \
             unsafe {{ b.launch(grid) }}.w()?;\n    Ok(())\n}}\n",
            name = e.name,
            file = e.file,
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms_and_skips_comments() {
        let src = "// HERD_INSTANTIATE(herd_old, (int x), f(x))\n\
            /* extern \"C\" __global__ void herd_gone(int) */\n\
            template <typename T> __device__ void f(const T* x) {}\n\
            HERD_INSTANTIATE(herd_a,\n  (const T* x, T *y, size_t n, int T_,\n   float s), f<T>(x))\n\
            extern \"C\" __global__ void herd_b(float* state, const uint64_t* starts, int P) {\n}";
        let e = parse("demo", src).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].name.as_str(), e[0].per_dtype), ("herd_a", true));
        let tys: Vec<Ty> = e[0].params.iter().map(|p| p.ty).collect();
        assert_eq!(
            tys,
            [
                Ty::In(Elem::T),
                Ty::Out(Elem::T),
                Ty::Value(Elem::Usize),
                Ty::Value(Elem::I32),
                Ty::Value(Elem::F32)
            ]
        );
        assert_eq!((e[1].name.as_str(), e[1].per_dtype), ("herd_b", false));
        assert_eq!(e[1].params[1].ty, Ty::In(Elem::U64));
        assert_eq!(e[1].params[2].name, "P");
    }

    #[test]
    fn unsupported_parameters_name_the_file_and_the_parameter() {
        let err = parse("x", "extern \"C\" __global__ void herd_c(double d) {}").unwrap_err();
        assert!(
            err.contains("cuda/x.cu: herd_c") && err.contains("`double d`"),
            "{err}"
        );
        let err = parse("x", "extern \"C\" __global__ void herd_c(const T* d) {}").unwrap_err();
        assert!(err.contains("T outside HERD_INSTANTIATE"), "{err}");
        let err = parse("x", "HERD_INSTANTIATE(herd_d, (const T* a, float** b), f)").unwrap_err();
        assert!(err.contains("`float** b`"), "{err}");
    }

    #[test]
    fn every_kernel_file_parses() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
        let mut names = Vec::new();
        for f in std::fs::read_dir(&dir).unwrap() {
            let path = f.unwrap().path();
            if path.extension().is_some_and(|x| x == "cu") {
                let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
                let src = std::fs::read_to_string(&path).unwrap();
                let entries = parse(&stem, &src).unwrap();
                assert!(!entries.is_empty(), "{stem}.cu declares no entry point");
                names.extend(entries.into_iter().map(|e| e.name));
            }
        }
        names.sort();
        assert!(names.contains(&"herd_adamw".to_string()), "{names:?}");
        assert!(
            names.contains(&"herd_add_rms_norm_bwd".to_string()),
            "{names:?}"
        );
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before, "an entry point is declared twice");
    }
}
