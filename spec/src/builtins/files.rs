//! Files and helpers: `load_file`, `load_json`, `load_yaml`.

#[allow(unused_imports)]
use super::*;

pub(super) fn resolve_relative(eval: &Evaluator, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    let (file, _) = call_site(eval);
    let dir = file
        .as_deref()
        .and_then(|f| Path::new(f).parent())
        .map(Path::to_path_buf)
        .unwrap_or_default();
    dir.join(p)
}

fn read_spec_file(eval: &Evaluator, builtin: &str, path: &str) -> Res<String> {
    let full = resolve_relative(eval, path);
    let text =
        crate::load::read_source(&full).map_err(|e| err(format!("{builtin}({path:?}): {e}")))?;
    if let Ok(c) = ctx(eval) {
        c.files.borrow_mut().push(full);
    }
    Ok(text)
}

fn path_arg<'v>(
    builtin: &'static str,
    args: UnpackTuple<Value<'v>>,
    kwargs: DictRef<'v>,
) -> Res<String> {
    let a = Args::new(builtin, args, kwargs)?;
    a.check(1, &["path"])?;
    a.string(a.required(0, "path")?, "path")
}

#[starlark_module]
pub(crate) fn files(builder: &mut GlobalsBuilder) {
    /// `load_file(path)`: a file's text, relative to the calling spec.
    fn load_file<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let path = path_arg("load_file", args, kwargs)?;
        let text = read_spec_file(eval, "load_file", &path)?;
        Ok(eval.heap().alloc(text))
    }

    /// `load_json(path)`: a JSON file, decoded.
    fn load_json<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let path = path_arg("load_json", args, kwargs)?;
        let text = read_spec_file(eval, "load_json", &path)?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| err(format!("load_json({path:?}): {e}")))?;
        Ok(json_to_value(&json, eval.heap()))
    }

    /// `load_yaml(path)`: a YAML file, decoded.
    fn load_yaml<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let path = path_arg("load_yaml", args, kwargs)?;
        let text = read_spec_file(eval, "load_yaml", &path)?;
        let json: serde_json::Value =
            serde_saphyr::from_str(&text).map_err(|e| err(format!("load_yaml({path:?}): {e}")))?;
        Ok(json_to_value(&json, eval.heap()))
    }
}
