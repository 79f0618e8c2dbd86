//! The REST API, version 1 (docs/cloud-api.md): the routes, their handlers, who may call
//! them, and the OpenAPI document generated from them (served at `/v1/openapi.json`).

use crate::auth;
use crate::daemon::Daemon;
use crate::error::ErrorBody;
use crate::model::{
    check_name, group_key, now, CreateGroup, CreateTenant, CreateVm, Desired, Event, Extension, Group, GroupStatus,
    Host, Image, IncomingAnswer, IncomingRequest, InstanceType, MigrateVm, MigrationReport, NewKey, Replacement,
    ReplacementQuery, RestoreVm, Role, SetPrice, Snapshot, Tenant, UpdateGroup, Usage, UsageQuery, Vm, VmMetrics,
    VmState, WhoAmI,
};
use crate::store::Table;
use crate::ControlError;
use axum::extract::{FromRequest, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use http_body_util::BodyExt;
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;
use tokio_stream::StreamExt;
use utoipa::OpenApi;

/// How long a request's body may take to arrive (an image upload: each piece of it).
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The largest body of any request but an image upload.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// The largest image an upload may carry.
pub const MAX_IMAGE_BYTES: u64 = 128 << 20;
/// The most of a console log one request returns.
pub const MAX_CONSOLE_BYTES: u64 = 1 << 20;

type D = State<Arc<Daemon>>;
type Res<T> = Result<T, ControlError>;

/// A JSON body whose rejection is one of ours (a JSON error body, not axum's text). It must be
/// an object: serde would read a struct from an array too (`[]` as an empty change).
pub struct Json<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ControlError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Res<Self> {
        let axum::Json(value) = axum::Json::<serde_json::Value>::from_request(request, state).await?;
        if !value.is_object() {
            return Err(ControlError::BadRequest(
                "malformed request body: it must be a JSON object".into(),
            ));
        }
        serde_json::from_value(value)
            .map(Json)
            .map_err(|e| ControlError::BadRequest(format!("malformed request body: {e}")))
    }
}

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> axum::response::Response {
        axum::Json(self.0).into_response()
    }
}

/// A path parameter whose rejection is one of ours.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ControlError))]
pub struct Path<T>(pub T);

/// A query whose rejection is one of ours.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ControlError))]
pub struct Query<T>(pub T);

/// The caller, known by its API key (`Authorization: Bearer KEY`).
pub struct Caller {
    /// Its tenant.
    pub tenant: Tenant,
}

impl Caller {
    fn is_admin(&self) -> bool {
        self.tenant.role == Role::Admin
    }

    fn require_admin(&self) -> Res<()> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ControlError::Forbidden("only an admin may do this".into()))
        }
    }

    /// Whether the caller may see and touch what `tenant` owns.
    fn may_touch(&self, tenant: &str) -> bool {
        self.is_admin() || self.tenant.name == tenant
    }
}

impl FromRequestParts<Arc<Daemon>> for Caller {
    type Rejection = ControlError;

    async fn from_request_parts(parts: &mut Parts, daemon: &Arc<Daemon>) -> Res<Self> {
        let unauthorized = || ControlError::Unauthorized("a valid API key is needed: Authorization: Bearer KEY".into());
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(unauthorized)?;
        let key = value.strip_prefix("Bearer ").ok_or_else(unauthorized)?.trim();
        let (id, secret) = auth::parse_key(key).ok_or_else(unauthorized)?;
        let stored: crate::model::StoredKey = daemon.store.get(Table::Keys, id).await?.ok_or_else(unauthorized)?;
        if !auth::verify(&stored, secret) {
            return Err(unauthorized());
        }
        let tenant = daemon
            .store
            .get(Table::Tenants, &stored.tenant)
            .await?
            .ok_or_else(unauthorized)?;
        Ok(Self { tenant })
    }
}

/// The router of the API.
pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/openapi.json", get(openapi))
        .route("/metrics", get(prometheus_metrics))
        .route("/v1/whoami", get(whoami))
        .route("/v1/tenants", get(list_tenants).post(create_tenant))
        .route("/v1/tenants/{tenant}", axum::routing::delete(delete_tenant))
        .route("/v1/tenants/{tenant}/keys", post(create_key))
        .route("/v1/instance-types", get(list_types).post(create_type))
        .route("/v1/images", get(list_images).post(upload_image))
        .route("/v1/images/{image}", axum::routing::delete(delete_image))
        .route("/v1/images/{image}/content", get(image_content))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{vm}", get(show_vm).delete(delete_vm))
        .route("/v1/vms/{vm}/start", post(start_vm))
        .route("/v1/vms/{vm}/stop", post(stop_vm))
        .route("/v1/vms/{vm}/pause", post(pause_vm))
        .route("/v1/vms/{vm}/resume", post(resume_vm))
        .route("/v1/vms/{vm}/console", get(console))
        .route("/v1/vms/{vm}/metrics", get(metrics))
        .route("/v1/vms/{vm}/snapshots", get(list_snapshots).post(create_snapshot))
        .route(
            "/v1/vms/{vm}/snapshots/{snapshot}",
            axum::routing::delete(delete_snapshot),
        )
        .route("/v1/vms/{vm}/snapshots/{snapshot}/files/{file}", get(snapshot_file))
        .route("/v1/vms/{vm}/extensions", get(list_extensions).post(add_extension))
        .route(
            "/v1/vms/{vm}/extensions/{name}",
            axum::routing::delete(remove_extension),
        )
        .route("/v1/vms/{vm}/restore", post(restore_vm))
        .route("/v1/vms/{vm}/migrate", post(migrate_vm))
        .route("/v1/vms/{vm}/incoming", post(incoming_vm).delete(abort_incoming))
        .route("/v1/groups", get(list_groups).post(create_group))
        .route(
            "/v1/groups/{group}",
            get(show_group).patch(update_group).delete(delete_group),
        )
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/hosts/{host}/drain", post(drain_host))
        .route("/v1/hosts/{host}/undrain", post(undrain_host))
        .route("/v1/hosts/{host}/price", post(set_host_price))
        .route("/v1/replacement", get(replacement_plan).post(carry_out_replacement))
        .route("/v1/usage", get(usage))
        .route("/v1/events", get(events))
        .fallback(|| async { ControlError::NotFound("no such route in API v1 (see /v1/openapi.json)".into()) })
        .method_not_allowed_fallback(|| async {
            ControlError::MethodNotAllowed("this route does not take that method (see /v1/openapi.json)".into())
        })
        .layer(axum::middleware::from_fn_with_state(daemon.clone(), to_the_vms_host))
        .layer(axum::middleware::from_fn(body_deadline))
        .with_state(daemon)
}

/// Reads a request's body (but an image's, which its handler streams with a deadline per
/// piece) within [`BODY_TIMEOUT`] before the handler sees it, so that a client that sends its
/// body slowly, or never, holds no handler. A body over [`MAX_BODY_BYTES`] is read on and
/// dropped, up to [`MAX_DRAINED_BYTES`], so that its sender is not cut off mid-write and
/// reads the 413 (a client writing its body before it reads the answer would see only a
/// broken connection).
async fn body_deadline(request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    if request.uri().path() == "/v1/images" {
        return next.run(request).await;
    }
    // A module is up to the VMM's limit; every other body up to the API's.
    let limit = if request.method() == axum::http::Method::POST && request.uri().path().ends_with("/extensions") {
        crate::extensions::MAX_MODULE_BYTES
    } else {
        MAX_BODY_BYTES
    };
    let (parts, mut body) = request.into_parts();
    let mut kept = Vec::new();
    let mut over = 0usize;
    let read = async {
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            if over == 0 && kept.len() + data.len() <= limit {
                kept.extend_from_slice(&data);
            } else {
                over += data.len();
                if over > MAX_DRAINED_BYTES {
                    break;
                }
            }
        }
        Ok::<(), axum::Error>(())
    };
    match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Ok(Ok(())) if over == 0 => next.run(axum::extract::Request::from_parts(parts, kept.into())).await,
        Ok(Ok(())) => {
            let mut answer =
                ControlError::TooLarge(format!("a request body here is at most {limit} bytes")).into_response();
            answer
                .headers_mut()
                .insert(header::CONNECTION, axum::http::HeaderValue::from_static("close"));
            answer
        }
        Ok(Err(e)) => ControlError::BadRequest(format!("the request body broke off: {e}")).into_response(),
        Err(_) => ControlError::Timeout(format!(
            "the request body did not arrive within {} s",
            BODY_TIMEOUT.as_secs()
        ))
        .into_response(),
    }
}

/// How much of a body over [`MAX_BODY_BYTES`] is read and dropped before the 413.
const MAX_DRAINED_BYTES: usize = 16 << 20;

/// In a cluster, sends a call that needs a VM's VMM to the host the VM is on, unless that
/// is this one (or the call was forwarded already). A VM whose host is not up gets a clear
/// error for such calls; start, stop and delete work on it here.
async fn to_the_vms_host(
    State(d): D,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if d.cluster.is_none() || request.headers().contains_key(crate::cluster::FORWARDED_BY) {
        return next.run(request).await;
    }
    let path = request.uri().path().trim_end_matches('/').to_string();
    let segments: Vec<&str> = path.split('/').collect();
    let (key, op) = match segments.as_slice() {
        ["", "v1", "vms", key] if request.method() == axum::http::Method::DELETE => (key.to_string(), String::new()),
        ["", "v1", "vms", key, "snapshots"] if request.method() == axum::http::Method::POST => {
            (key.to_string(), "snapshots".to_string())
        }
        ["", "v1", "vms", key, op @ ("start" | "stop" | "pause" | "resume" | "console" | "metrics" | "restore" | "migrate")] => {
            (key.to_string(), op.to_string())
        }
        ["", "v1", "vms", key, "extensions", ..] => (key.to_string(), "extensions".to_string()),
        _ => return next.run(request).await,
    };
    let key = percent_decode(&key);
    let (mut parts, body) = request.into_parts();
    let routed = async {
        let caller = Caller::from_request_parts(&mut parts, &d).await?;
        let vm = find_vm(&d, &caller, &key).await?;
        if d.is_mine(&vm) {
            return Ok(None);
        }
        let Some(host) = vm.host.clone() else {
            return Ok(None);
        };
        let record = crate::cluster::hosts(&d).await?.into_iter().find(|h| h.name == host);
        match (record, op.as_str()) {
            (Some(record), _) => Ok(Some(record)),
            (None, "start" | "stop" | "") => Ok(None),
            (None, _) => Err(ControlError::Conflict(format!(
                "VM {} is on host {host}, which is not up",
                vm.name
            ))),
        }
    }
    .await;
    let request = axum::extract::Request::from_parts(parts, body);
    match routed {
        Ok(None) => next.run(request).await,
        Ok(Some(host)) => crate::cluster::forward(&d, &host, request)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        Err(e) => e.into_response(),
    }
}

/// `%XX` escapes in a path segment decoded (a VM key is ASCII; anything else stays as is).
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| segment.to_string())
}

/// This host's figures in Prometheus' text format (admin).
#[utoipa::path(get, path = "/metrics",
    responses((status = 200, content_type = "text/plain", body = String), (status = 403, body = ErrorBody)))]
async fn prometheus_metrics(State(d): D, caller: Caller) -> Res<impl IntoResponse> {
    caller.require_admin()?;
    let text = crate::prometheus::render(&d).await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    ))
}

/// The OpenAPI document of this API.
#[derive(OpenApi)]
#[openapi(
    info(title = "xcloudd", description = "The xcloud control plane's REST API (docs/cloud-api.md)"),
    paths(
        whoami, list_tenants, create_tenant, delete_tenant, create_key, list_types, create_type, list_images,
        upload_image, delete_image, image_content, list_vms, create_vm, show_vm, delete_vm, start_vm, stop_vm, pause_vm,
        resume_vm, console, metrics, list_snapshots, create_snapshot, delete_snapshot, snapshot_file, list_extensions, add_extension,
        remove_extension, restore_vm, migrate_vm, incoming_vm,
        abort_incoming, list_groups, create_group, show_group, update_group, delete_group, list_hosts, drain_host, undrain_host, set_host_price, replacement_plan,
        carry_out_replacement, usage, events, prometheus_metrics
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerKey),
    security(("api_key" = []))
)]
pub struct ApiDoc;

struct BearerKey;

impl utoipa::Modify for BearerKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

async fn openapi() -> impl IntoResponse {
    axum::Json(ApiDoc::openapi())
}

/// Who the key belongs to.
#[utoipa::path(get, path = "/v1/whoami", responses((status = 200, body = WhoAmI), (status = 401, body = ErrorBody)))]
async fn whoami(caller: Caller) -> Json<WhoAmI> {
    Json(WhoAmI {
        tenant: caller.tenant.name,
        role: caller.tenant.role,
        quota: caller.tenant.quota,
    })
}

/// Every tenant (admin).
#[utoipa::path(get, path = "/v1/tenants", responses((status = 200, body = Vec<Tenant>), (status = 403, body = ErrorBody)))]
async fn list_tenants(State(d): D, caller: Caller) -> Res<Json<Vec<Tenant>>> {
    caller.require_admin()?;
    Ok(Json(d.store.list(Table::Tenants).await?))
}

/// A new tenant and its first key (admin).
#[utoipa::path(post, path = "/v1/tenants", request_body = CreateTenant,
    responses((status = 201, body = NewKey), (status = 409, body = ErrorBody)))]
async fn create_tenant(State(d): D, caller: Caller, Json(req): Json<CreateTenant>) -> Res<(StatusCode, Json<NewKey>)> {
    caller.require_admin()?;
    check_name("tenant", &req.name)?;
    let tenant = Tenant {
        name: req.name.clone(),
        role: Role::Tenant,
        quota: req.quota.unwrap_or_default(),
        cpu_weight: req.cpu_weight.unwrap_or(100).clamp(1, 10_000),
        created: now(),
    };
    if !d.store.put_new(Table::Tenants, &req.name, &tenant).await? {
        return Err(ControlError::Conflict(format!("tenant {} exists", req.name)));
    }
    let key = issue_key(&d, &req.name).await?;
    d.emit(&req.name, "tenant.created", &req.name, None);
    Ok((StatusCode::CREATED, Json(key)))
}

async fn issue_key(d: &Daemon, tenant: &str) -> Res<NewKey> {
    let (stored, key) = auth::new_key(tenant)?;
    d.store.put(Table::Keys, &stored.id.clone(), &stored).await?;
    Ok(NewKey {
        tenant: tenant.into(),
        key,
    })
}

/// Removes a tenant that holds nothing, and its keys (admin).
#[utoipa::path(delete, path = "/v1/tenants/{tenant}", params(("tenant" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_tenant(State(d): D, caller: Caller, Path(name): Path<String>) -> Res<StatusCode> {
    caller.require_admin()?;
    if name == "admin" {
        return Err(ControlError::Conflict("the admin tenant cannot be removed".into()));
    }
    let _records = d.lock_records().await?;
    if d.store.get::<Tenant>(Table::Tenants, &name).await?.is_none() {
        return Err(ControlError::NotFound(format!("no tenant {name}")));
    }
    let vms = d
        .store
        .list::<Vm>(Table::Vms)
        .await?
        .into_iter()
        .filter(|v| v.tenant == name)
        .count();
    let images = d.images_of(&name).await?.len();
    let groups = d
        .store
        .list::<Group>(Table::Groups)
        .await?
        .into_iter()
        .filter(|g| g.tenant == name)
        .count();
    if vms + images + groups > 0 {
        return Err(ControlError::Conflict(format!(
            "tenant {name} still holds {vms} VMs, {images} images and {groups} autoscaling groups"
        )));
    }
    for k in d.store.list::<crate::model::StoredKey>(Table::Keys).await? {
        if k.tenant == name {
            d.store.delete(Table::Keys, &k.id).await?;
        }
    }
    d.store.delete(Table::Tenants, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Another API key for a tenant (admin, or the tenant itself).
#[utoipa::path(post, path = "/v1/tenants/{tenant}/keys", params(("tenant" = String, Path)),
    responses((status = 201, body = NewKey), (status = 404, body = ErrorBody)))]
async fn create_key(State(d): D, caller: Caller, Path(name): Path<String>) -> Res<(StatusCode, Json<NewKey>)> {
    if !caller.may_touch(&name) || d.store.get::<Tenant>(Table::Tenants, &name).await?.is_none() {
        return Err(ControlError::NotFound(format!("no tenant {name}")));
    }
    Ok((StatusCode::CREATED, Json(issue_key(&d, &name).await?)))
}

/// The instance types VMs can be made of.
#[utoipa::path(get, path = "/v1/instance-types", responses((status = 200, body = Vec<InstanceType>)))]
async fn list_types(State(d): D, _caller: Caller) -> Res<Json<Vec<InstanceType>>> {
    Ok(Json(d.store.list(Table::InstanceTypes).await?))
}

/// Adds or changes an instance type (admin).
#[utoipa::path(post, path = "/v1/instance-types", request_body = InstanceType,
    responses((status = 201, body = InstanceType), (status = 400, body = ErrorBody)))]
async fn create_type(
    State(d): D,
    caller: Caller,
    Json(t): Json<InstanceType>,
) -> Res<(StatusCode, Json<InstanceType>)> {
    caller.require_admin()?;
    check_name("instance type", &t.name)?;
    if t.vcpus == 0
        || t.vcpus > 64
        || t.mem_mib < 2
        || t.mem_mib > (1 << 20)
        || !t.price_per_hour.is_finite()
        || t.price_per_hour < 0.0
    {
        return Err(ControlError::BadRequest(
            "an instance type has 1-64 vCPUs, 2 MiB - 1 TiB of memory and a price >= 0".into(),
        ));
    }
    d.store.put(Table::InstanceTypes, &t.name.clone(), &t).await?;
    Ok((StatusCode::CREATED, Json(t)))
}

/// The caller's images (an admin's: every tenant's).
#[utoipa::path(get, path = "/v1/images", responses((status = 200, body = Vec<Image>)))]
async fn list_images(State(d): D, caller: Caller) -> Res<Json<Vec<Image>>> {
    let all: Vec<Image> = d.store.list(Table::Images).await?;
    Ok(Json(all.into_iter().filter(|i| caller.may_touch(&i.tenant)).collect()))
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
struct ImageQuery {
    /// The image's name.
    name: String,
}

/// Uploads a PVH ELF image (the body, at most 128 MiB); it is named by its SHA-256.
#[utoipa::path(post, path = "/v1/images", params(ImageQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = Image), (status = 400, body = ErrorBody), (status = 413, body = ErrorBody)))]
async fn upload_image(
    State(d): D,
    caller: Caller,
    Query(q): Query<ImageQuery>,
    body: axum::body::Body,
) -> Res<(StatusCode, Json<Image>)> {
    if let Err(e) = check_name("image", &q.name) {
        drain(body).await;
        return Err(e);
    }
    let dir = d.config.data_dir.join("images");
    let partial = dir.join(format!(".upload-{}", auth::hex(&auth::random_bytes::<8>()?)));
    let result = receive_image(body, &partial).await;
    let (digest, size) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    let id = format!("sha256:{digest}");
    let blob = d.image_path(&id);
    std::fs::rename(&partial, &blob).map_err(|e| ControlError::io("storing the image", e))?;
    let image = Image {
        id: id.clone(),
        tenant: caller.tenant.name.clone(),
        name: q.name.clone(),
        size,
        created: now(),
    };
    let _records = d.lock_records().await?;
    let mine = d.images_of(&caller.tenant.name).await?;
    if let Some(same) = mine.iter().find(|i| i.id == id && i.name == q.name) {
        return Ok((StatusCode::OK, Json(same.clone())));
    }
    if mine.iter().any(|i| i.name == q.name) {
        return Err(ControlError::Conflict(format!(
            "an image named {} exists: delete it first or choose another name",
            q.name
        )));
    }
    if mine.iter().any(|i| i.id == id) {
        return Err(ControlError::Conflict(format!(
            "this image is uploaded already as {id}"
        )));
    }
    d.store
        .put(Table::Images, &format!("{}/{id}", caller.tenant.name), &image)
        .await?;
    d.emit(&caller.tenant.name, "image.created", &id, Some(q.name));
    Ok((StatusCode::CREATED, Json(image)))
}

/// Streams an upload into `path`, hashing it and checking it is an x86-64 ELF executable.
/// Reads and drops what is left of a body refused before it was read (up to
/// [`MAX_DRAINED_BYTES`], within [`BODY_TIMEOUT`]), so that a client that writes its body
/// before it reads the answer gets the answer, not a connection closed under its write.
async fn drain(mut body: axum::body::Body) {
    let read = async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.into_data().map_or(0, |d| d.len());
            if seen > MAX_DRAINED_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(BODY_TIMEOUT, read).await;
}

async fn receive_image(mut body: axum::body::Body, path: &std::path::Path) -> Res<(String, u64)> {
    use sha2::Digest;
    let mut file = std::fs::File::create(path).map_err(|e| ControlError::io("receiving an image", e))?;
    let mut hasher = sha2::Sha256::new();
    let mut size = 0u64;
    let mut head = Vec::with_capacity(64);
    loop {
        let next = tokio::time::timeout(BODY_TIMEOUT, body.frame())
            .await
            .map_err(|_| ControlError::Timeout(format!("the upload stalled for {} s", BODY_TIMEOUT.as_secs())))?;
        let Some(frame) = next else { break };
        let frame = frame.map_err(|e| ControlError::BadRequest(format!("the upload broke off: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        size += data.len() as u64;
        if size > MAX_IMAGE_BYTES {
            return Err(ControlError::TooLarge(format!(
                "an image is at most {} MiB",
                MAX_IMAGE_BYTES >> 20
            )));
        }
        if head.len() < 64 {
            let take = (64 - head.len()).min(data.len());
            head.extend_from_slice(&data[..take]);
        }
        hasher.update(&data);
        file.write_all(&data)
            .map_err(|e| ControlError::io("receiving an image", e))?;
    }
    check_elf(&head)?;
    file.sync_all().map_err(|e| ControlError::io("receiving an image", e))?;
    Ok((auth::hex(&hasher.finalize()), size))
}

/// Whether `head` (the first 64 bytes) starts an x86-64 ELF executable; the VMM checks the
/// rest (its PVH note) when it boots it.
fn check_elf(head: &[u8]) -> Res<()> {
    let bad = |why: &str| Err(ControlError::BadRequest(format!("not a PVH ELF image: {why}")));
    if head.len() < 64 {
        return bad("shorter than an ELF header");
    }
    if &head[..4] != b"\x7fELF" {
        return bad("no ELF magic");
    }
    if head[4] != 2 || head[5] != 1 {
        return bad("not a 64-bit little-endian ELF");
    }
    if u16::from_le_bytes([head[16], head[17]]) != 2 {
        return bad("not an executable (ET_EXEC)");
    }
    if u16::from_le_bytes([head[18], head[19]]) != 62 {
        return bad("not for x86-64");
    }
    Ok(())
}

/// Removes one of the caller's images (refused while a VM boots from it).
#[utoipa::path(delete, path = "/v1/images/{image}", params(("image" = String, Path, description = "id or name")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_image(State(d): D, caller: Caller, Path(key): Path<String>) -> Res<StatusCode> {
    let _records = d.lock_records().await?;
    let image = d
        .images_of(&caller.tenant.name)
        .await?
        .into_iter()
        .find(|i| i.id == key || i.name == key)
        .ok_or_else(|| ControlError::NotFound(format!("no image {key}")))?;
    let users: Vec<String> = d
        .store
        .list::<Vm>(Table::Vms)
        .await?
        .into_iter()
        .filter(|v| v.tenant == image.tenant && v.image == image.id)
        .map(|v| v.name)
        .collect();
    if !users.is_empty() {
        return Err(ControlError::Conflict(format!(
            "image {} is used by VMs {}",
            image.name,
            users.join(", ")
        )));
    }
    d.store
        .delete(Table::Images, &format!("{}/{}", image.tenant, image.id))
        .await?;
    let still_used = d
        .store
        .list::<Image>(Table::Images)
        .await?
        .iter()
        .any(|i| i.id == image.id);
    if !still_used {
        let _ = std::fs::remove_file(d.image_path(&image.id));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// An image's bytes (as a host fetches them from another to boot a VM there).
#[utoipa::path(get, path = "/v1/images/{image}/content", params(("image" = String, Path, description = "id or name")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = ErrorBody)))]
async fn image_content(State(d): D, caller: Caller, Path(key): Path<String>) -> Res<impl IntoResponse> {
    let image = d
        .store
        .list::<Image>(Table::Images)
        .await?
        .into_iter()
        .find(|i| caller.may_touch(&i.tenant) && (i.id == key || (i.name == key && i.tenant == caller.tenant.name)))
        .ok_or_else(|| ControlError::NotFound(format!("no image {key}")))?;
    let bytes = tokio::fs::read(d.image_path(&image.id))
        .await
        .map_err(|_| ControlError::NotFound(format!("image {key} is not on this host")))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes))
}

/// Finds a VM by id or by the caller's name for it; another tenant's VM is not found.
async fn find_vm(d: &Daemon, caller: &Caller, key: &str) -> Res<Vm> {
    let not_found = || ControlError::NotFound(format!("no VM {key}"));
    if key.starts_with("vm-") {
        if let Some(vm) = d.store.get::<Vm>(Table::Vms, key).await? {
            return if caller.may_touch(&vm.tenant) {
                Ok(vm)
            } else {
                Err(not_found())
            };
        }
    }
    d.store
        .list::<Vm>(Table::Vms)
        .await?
        .into_iter()
        .find(|v| v.tenant == caller.tenant.name && v.name == key)
        .ok_or_else(not_found)
}

/// The caller's VMs (an admin's: every tenant's).
#[utoipa::path(get, path = "/v1/vms", responses((status = 200, body = Vec<Vm>)))]
async fn list_vms(State(d): D, caller: Caller) -> Res<Json<Vec<Vm>>> {
    let all: Vec<Vm> = d.store.list(Table::Vms).await?;
    Ok(Json(all.into_iter().filter(|v| caller.may_touch(&v.tenant)).collect()))
}

/// Makes a VM from an image and an instance type, within the tenant's quota, and boots it
/// unless `start` is false.
#[utoipa::path(post, path = "/v1/vms", request_body = CreateVm,
    responses((status = 201, body = Vm), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 502, body = ErrorBody)))]
async fn create_vm(State(d): D, caller: Caller, Json(req): Json<CreateVm>) -> Res<(StatusCode, Json<Vm>)> {
    let vm = crate::provision::create_vm(&d, &caller.tenant, &req, None).await?;
    let vm = match (req.start.unwrap_or(true), d.cluster.is_some()) {
        (false, _) => vm,
        (true, false) => d.start(&vm.id).await?,
        (true, true) => wait_started(&d, &vm.id).await?,
    };
    Ok((StatusCode::CREATED, Json(vm)))
}

/// How long a call waits for the scheduler and a host to start a VM.
const PLACE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(40);

/// Waits until VM `id`, which waits for a host, runs, or did not start. When the scheduler
/// finds no host that fits, or it still waits after [`PLACE_TIMEOUT`], it is answered as it
/// is: `pending`, with the reason in `exit`.
async fn wait_started(d: &Daemon, id: &str) -> Res<Vm> {
    let deadline = tokio::time::Instant::now() + PLACE_TIMEOUT;
    loop {
        let vm = d.vm(id).await?;
        let placed_or_waiting = vm.host.is_some() || vm.exit.is_none();
        match vm.state {
            // Still unplaced with a reason noted: no host fits now; the answer says why.
            VmState::Pending if !placed_or_waiting => return Ok(vm),
            VmState::Pending | VmState::Starting if tokio::time::Instant::now() < deadline => {}
            VmState::Failed => {
                return Err(ControlError::Vmm(format!(
                    "VM {} did not start: {}",
                    vm.name,
                    vm.exit.unwrap_or_default()
                )))
            }
            _ => return Ok(vm),
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The caller's autoscaling groups (an admin's: every tenant's).
#[utoipa::path(get, path = "/v1/groups", responses((status = 200, body = Vec<GroupStatus>)))]
async fn list_groups(State(d): D, caller: Caller) -> Res<Json<Vec<GroupStatus>>> {
    let mut all: Vec<Group> = d.store.list(Table::Groups).await?;
    all.retain(|g| caller.may_touch(&g.tenant));
    Ok(Json(with_members(&d, all).await?))
}

/// `group` with its VMs' names, oldest first.
async fn with_its_members(d: &Daemon, group: Group) -> Res<GroupStatus> {
    let name = group.name.clone();
    with_members(d, vec![group])
        .await?
        .pop()
        .ok_or_else(|| ControlError::NotFound(format!("no group {name}")))
}

/// `groups` with their VMs' names, oldest first.
async fn with_members(d: &Daemon, groups: Vec<Group>) -> Res<Vec<GroupStatus>> {
    let mut vms: Vec<Vm> = d.store.list::<Vm>(Table::Vms).await?;
    vms.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    Ok(groups
        .into_iter()
        .map(|group| GroupStatus {
            vms: vms.iter().filter(|v| group.has(v)).map(|v| v.name.clone()).collect(),
            group,
        })
        .collect())
}

/// Makes an autoscaling group; its first VMs come at the autoscaler's next look.
#[utoipa::path(post, path = "/v1/groups", request_body = CreateGroup,
    responses((status = 201, body = Group), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_group(State(d): D, caller: Caller, Json(req): Json<CreateGroup>) -> Res<(StatusCode, Json<Group>)> {
    let group = crate::autoscale::create_group(&d, &caller.tenant, req).await?;
    Ok((StatusCode::CREATED, Json(group)))
}

/// The caller's group `name` (an admin may name any tenant's, the first found).
async fn find_group(d: &Daemon, caller: &Caller, name: &str) -> Res<Group> {
    if let Some(g) = d
        .store
        .get(Table::Groups, &group_key(&caller.tenant.name, name))
        .await?
    {
        return Ok(g);
    }
    let not_found = || ControlError::NotFound(format!("no group {name}"));
    if !caller.is_admin() {
        return Err(not_found());
    }
    let all: Vec<Group> = d.store.list(Table::Groups).await?;
    all.into_iter().find(|g| g.name == name).ok_or_else(not_found)
}

/// One group and its VMs.
#[utoipa::path(get, path = "/v1/groups/{group}", params(("group" = String, Path, description = "its name")),
    responses((status = 200, body = GroupStatus), (status = 404, body = ErrorBody)))]
async fn show_group(State(d): D, caller: Caller, Path(name): Path<String>) -> Res<Json<GroupStatus>> {
    let group = find_group(&d, &caller, &name).await?;
    Ok(Json(with_its_members(&d, group).await?))
}

/// Changes a group's bounds, target or cooldown; the autoscaler follows at its next look.
#[utoipa::path(patch, path = "/v1/groups/{group}", params(("group" = String, Path, description = "its name")),
    request_body = UpdateGroup, responses((status = 200, body = GroupStatus), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn update_group(
    State(d): D,
    caller: Caller,
    Path(name): Path<String>,
    Json(req): Json<UpdateGroup>,
) -> Res<Json<GroupStatus>> {
    let group = find_group(&d, &caller, &name).await?;
    let updated = d
        .store
        .update(Table::Groups, &group.key(), |g: &mut Group| {
            if let Some(metric) = req.metric {
                if req.target.is_none() && metric != g.metric {
                    return Err(ControlError::BadRequest(format!(
                        "a group that follows another metric needs its target too (\"target\" with \"metric\": {})",
                        serde_json::to_string(&metric).unwrap_or_default()
                    )));
                }
                g.metric = metric;
            }
            g.min = req.min.unwrap_or(g.min);
            g.max = req.max.unwrap_or(g.max);
            g.target = req.target.unwrap_or(g.target);
            g.cooldown_seconds = req.cooldown_seconds.unwrap_or(g.cooldown_seconds);
            g.check()
        })
        .await?
        .ok_or_else(|| ControlError::NotFound(format!("no group {name}")))?;
    d.emit(&updated.tenant, "group.updated", &updated.name, None);
    Ok(Json(with_its_members(&d, updated).await?))
}

/// Removes a group and its VMs.
#[utoipa::path(delete, path = "/v1/groups/{group}", params(("group" = String, Path, description = "its name")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
async fn delete_group(State(d): D, caller: Caller, Path(name): Path<String>) -> Res<StatusCode> {
    let group = find_group(&d, &caller, &name).await?;
    crate::autoscale::delete_group(&d, &group).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// One VM.
#[utoipa::path(get, path = "/v1/vms/{vm}", params(("vm" = String, Path, description = "id or name")),
    responses((status = 200, body = Vm), (status = 404, body = ErrorBody)))]
async fn show_vm(State(d): D, caller: Caller, Path(key): Path<String>) -> Res<Json<Vm>> {
    Ok(Json(find_vm(&d, &caller, &key).await?))
}

/// Stops a VM if it runs and removes it, its files and its snapshots.
#[utoipa::path(delete, path = "/v1/vms/{vm}", params(("vm" = String, Path, description = "id or name")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
async fn delete_vm(State(d): D, caller: Caller, Path(key): Path<String>) -> Res<StatusCode> {
    let vm = find_vm(&d, &caller, &key).await?;
    d.delete(&vm.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Boots a VM that has no VMM.
#[utoipa::path(post, path = "/v1/vms/{vm}/start", params(("vm" = String, Path, description = "id or name")),
    responses((status = 200, body = Vm), (status = 409, body = ErrorBody), (status = 502, body = ErrorBody)))]
async fn start_vm(State(d): D, caller: Caller, Path(key): Path<String>) -> Res<Json<Vm>> {
    let vm = find_vm(&d, &caller, &key).await?;
    if d.cluster.is_none() || d.is_mine(&vm) {
        return Ok(Json(d.start(&vm.id).await?));
    }
    // Not on a host that is up (it would have been forwarded there): the scheduler places it.
    if vm.state.has_vmm() {
        return Err(ControlError::Conflict(
            format!("VM {} is {:?} already", vm.name, vm.state).to_lowercase(),
        ));
    }
    d.store
        .update(Table::Vms, &vm.id, |v: &mut Vm| {
            v.want = Desired::Running;
            v.state = VmState::Pending;
            v.host = None;
            v.exit = None;
            Ok(())
        })
        .await?;
    Ok(Json(wait_started(&d, &vm.id).await?))
}

/// Stops a VM's VMM (the VM stays defined).
#[utoipa::path(post, path = "/v1/vms/{vm}/stop", params(("vm" = String, Path, description = "id or name")),
    responses((status = 200, body = Vm), (status = 409, body = ErrorBody)))]
async fn stop_vm(State(d): D, caller: Caller, Path(key): Path<String>) -> Res<Json<Vm>> {
    let vm = find_vm(&d, &caller, &key).await?;
    Ok(Json(d.stop(&vm.id).await?))
}

/// Stops a running VM's vCPUs.
#[utoipa::path(post, path = "/v1/vms/{vm}/pause", params(("vm" = String, Path, description = "id or name")),
    responses((status = 200, body = Vm), (status = 409, body = ErrorBody)))]
async fn pause_vm(State(d): D, caller: Caller, Path(key): Path<String>) -> Res<Json<Vm>> {
    let vm = find_vm(&d, &caller, &key).await?;
    Ok(Json(d.set_paused(&vm.id, true).await?))
}

/// Lets a paused VM's vCPUs run again.
#[utoipa::path(post, path = "/v1/vms/{vm}/resume", params(("vm" = String, Path, description = "id or name")),
    responses((status = 200, body = Vm), (status = 409, body = ErrorBody)))]
async fn resume_vm(State(d): D, caller: Caller, Path(key): Path<String>) -> Res<Json<Vm>> {
    let vm = find_vm(&d, &caller, &key).await?;
    Ok(Json(d.set_paused(&vm.id, false).await?))
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
struct ConsoleQuery {
    /// How many bytes from the end of the log (default 65536, at most 1 MiB).
    bytes: Option<u64>,
}

/// The end of a VM's console output (over all its runs).
#[utoipa::path(get, path = "/v1/vms/{vm}/console", params(("vm" = String, Path, description = "id or name"), ConsoleQuery),
    responses((status = 200, content_type = "text/plain", body = String), (status = 404, body = ErrorBody)))]
async fn console(
    State(d): D,
    caller: Caller,
    Path(key): Path<String>,
    Query(q): Query<ConsoleQuery>,
) -> Res<impl IntoResponse> {
    let vm = find_vm(&d, &caller, &key).await?;
    let want = q.bytes.unwrap_or(64 << 10).min(MAX_CONSOLE_BYTES);
    let mut text = Vec::new();
    if let Ok(mut f) = std::fs::File::open(d.console_log(&vm.id)) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(want)));
        let _ = f.take(want).read_to_end(&mut text);
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text))
}

/// A VM's resource use.
#[utoipa::path(get, path = "/v1/vms/{vm}/metrics", params(("vm" = String, Path, description = "id or name")),
    responses((status = 200, body = VmMetrics), (status = 404, body = ErrorBody)))]
async fn metrics(State(d): D, caller: Caller, Path(key): Path<String>) -> Res<Json<VmMetrics>> {
    let vm = find_vm(&d, &caller, &key).await?;
    let pid = vm.pid.filter(|_| vm.state.has_vmm()).map(|p| d.vmm_pid(p));
    let status = if vm.state.has_vmm() && d.is_mine(&vm) {
        d.vmm_status(&vm.id).await
    } else {
        None
    };
    let (migration, guest_load) = status.map_or((None, None), |s| (s.migration, s.guest_load));
    Ok(Json(VmMetrics {
        state: vm.state,
        cpu_seconds: pid.and_then(crate::host::cpu_seconds).unwrap_or(0.0),
        rss_bytes: pid.and_then(crate::host::rss_bytes).unwrap_or(0),
        run_seconds: vm.run_seconds_now(),
        vmm_pid: pid,
        cgroups: d.cgroup_dirs(&vm).iter().map(|p| p.display().to_string()).collect(),
        migration,
        guest_load: guest_load.map(|(load, _)| load),
        guest_load_age_seconds: guest_load.map(|(_, age)| age.as_secs_f64()),
    }))
}

/// A VM's snapshots.
#[utoipa::path(get, path = "/v1/vms/{vm}/snapshots", params(("vm" = String, Path, description = "id or name")),
    responses((status = 200, body = Vec<Snapshot>), (status = 404, body = ErrorBody)))]
async fn list_snapshots(State(d): D, caller: Caller, Path(key): Path<String>) -> Res<Json<Vec<Snapshot>>> {
    let vm = find_vm(&d, &caller, &key).await?;
    let all: Vec<Snapshot> = d.store.list(Table::Snapshots).await?;
    Ok(Json(all.into_iter().filter(|s| s.vm == vm.id).collect()))
}

/// Takes a snapshot of a running or paused VM (a running one goes on after it).
#[utoipa::path(post, path = "/v1/vms/{vm}/snapshots", params(("vm" = String, Path, description = "id or name")),
    responses((status = 201, body = Snapshot), (status = 409, body = ErrorBody)))]
async fn create_snapshot(State(d): D, caller: Caller, Path(key): Path<String>) -> Res<(StatusCode, Json<Snapshot>)> {
    let vm = find_vm(&d, &caller, &key).await?;
    Ok((StatusCode::CREATED, Json(d.snapshot(&vm.id).await?)))
}

/// A VM's extension modules: the provider's and the tenant's, with their calls, time,
/// failures and figures.
#[utoipa::path(get, path = "/v1/vms/{vm}/extensions", params(("vm" = String, Path, description = "id or name")),
    responses((status = 200, body = Vec<Extension>), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn list_extensions(State(d): D, caller: Caller, Path(key): Path<String>) -> Res<Json<Vec<Extension>>> {
    let vm = find_vm(&d, &caller, &key).await?;
    Ok(Json(d.extensions(&vm.id).await?))
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct ExtensionQuery {
    /// The module's name in the VM (1-32 of a-z, 0-9, '-', '_').
    name: String,
    /// Its version.
    version: Option<String>,
    /// The ports it serves in the extension window, `FIRST+COUNT` (e.g. 0x5000+16).
    ports: Option<String>,
}

/// Installs a tenant's extension module (the body: WebAssembly or its text form, at most
/// 4 MiB) into the VM's running VMM, under the provider's policy.
#[utoipa::path(post, path = "/v1/vms/{vm}/extensions", params(("vm" = String, Path, description = "id or name"), ExtensionQuery),
    request_body(content = Vec<u8>, content_type = "application/wasm"),
    responses((status = 201, body = Extension), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody)))]
async fn add_extension(
    State(d): D,
    caller: Caller,
    Path(key): Path<String>,
    Query(q): Query<ExtensionQuery>,
    body: axum::body::Bytes,
) -> Res<(StatusCode, Json<Extension>)> {
    let vm = find_vm(&d, &caller, &key).await?;
    let ports = q
        .ports
        .as_deref()
        .map(xcloud_api::extensions::parse_ports)
        .transpose()
        .map_err(ControlError::BadRequest)?;
    if q.version.as_ref().is_some_and(|v| v.is_empty() || v.len() > 64) {
        return Err(ControlError::BadRequest("a version is 1 to 64 characters".into()));
    }
    if body.is_empty() {
        return Err(ControlError::BadRequest(
            "the body is the module, and it is empty".into(),
        ));
    }
    let added = d.add_extension(&vm.id, &q.name, q.version, ports, &body).await?;
    Ok((StatusCode::CREATED, Json(added)))
}

/// Removes a tenant's extension module from the VM's running VMM (a provider module stays:
/// 403).
#[utoipa::path(delete, path = "/v1/vms/{vm}/extensions/{name}",
    params(("vm" = String, Path, description = "id or name"), ("name" = String, Path, description = "the module's name")),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn remove_extension(State(d): D, caller: Caller, Path((key, name)): Path<(String, String)>) -> Res<StatusCode> {
    let vm = find_vm(&d, &caller, &key).await?;
    d.remove_extension(&vm.id, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Runs a VM from one of its snapshots (its current VMM, if any, is stopped first).
#[utoipa::path(post, path = "/v1/vms/{vm}/restore", params(("vm" = String, Path, description = "id or name")),
    request_body = RestoreVm, responses((status = 200, body = Vm), (status = 404, body = ErrorBody)))]
async fn restore_vm(State(d): D, caller: Caller, Path(key): Path<String>, Json(req): Json<RestoreVm>) -> Res<Json<Vm>> {
    let vm = find_vm(&d, &caller, &key).await?;
    let snap = find_snapshot(&d, &vm, &req.snapshot).await?;
    // Taken on another host (before the VM moved here): a copy comes here first.
    if let Some(cluster) = &d.cluster {
        crate::snapshots::fetch(&d, &crate::cluster::peers(&d, cluster).await?, &snap).await?;
    }
    Ok(Json(d.restore(&vm.id, &snap).await?))
}

/// Snapshot `id` of `vm`; another VM's is not found.
async fn find_snapshot(d: &Daemon, vm: &Vm, id: &str) -> Res<Snapshot> {
    d.store
        .get(Table::Snapshots, id)
        .await?
        .filter(|s: &Snapshot| s.vm == vm.id)
        .ok_or_else(|| ControlError::NotFound(format!("VM {} has no snapshot {id}", vm.name)))
}

/// Deletes a snapshot: its record at once, its files on this host at once and on the other
/// hosts that hold a copy within a few minutes.
#[utoipa::path(delete, path = "/v1/vms/{vm}/snapshots/{snapshot}",
    params(("vm" = String, Path, description = "id or name"), ("snapshot" = String, Path, description = "id")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
async fn delete_snapshot(State(d): D, caller: Caller, Path((key, id)): Path<(String, String)>) -> Res<StatusCode> {
    let vm = find_vm(&d, &caller, &key).await?;
    let snap = find_snapshot(&d, &vm, &id).await?;
    d.store.delete(Table::Snapshots, &snap.id).await?;
    let _ = std::fs::remove_dir_all(d.snapshot_dir(&vm.id, &snap.id));
    d.emit(&vm.tenant, "snapshot.deleted", &snap.id, Some(vm.id.clone()));
    Ok(StatusCode::NO_CONTENT)
}

/// One file of a snapshot (`vm.state` or `memory.pages`), from this host's disk: how another
/// host copies it, or how its tenant keeps it elsewhere. Its digest is in the snapshot's record.
#[utoipa::path(get, path = "/v1/vms/{vm}/snapshots/{snapshot}/files/{file}",
    params(("vm" = String, Path, description = "id or name"), ("snapshot" = String, Path, description = "id"),
        ("file" = String, Path, description = "vm.state or memory.pages")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = ErrorBody)))]
async fn snapshot_file(
    State(d): D,
    caller: Caller,
    Path((key, id, file)): Path<(String, String, String)>,
) -> Res<impl IntoResponse> {
    let vm = find_vm(&d, &caller, &key).await?;
    let snap = find_snapshot(&d, &vm, &id).await?;
    if !crate::model::SNAPSHOT_FILES.contains(&file.as_str()) {
        return Err(ControlError::NotFound(format!(
            "a snapshot has no file {file:?}: its files are {}",
            crate::model::SNAPSHOT_FILES.join(" and ")
        )));
    }
    let path = d.snapshot_dir(&vm.id, &snap.id).join(&file);
    let opened = tokio::fs::File::open(&path).await.map_err(|_| {
        let holders: Vec<&str> = snap.holders().collect();
        ControlError::NotFound(format!(
            "snapshot {id} is not on this host (it is on {})",
            if holders.is_empty() {
                "no host".to_string()
            } else {
                holders.join(", ")
            }
        ))
    })?;
    let bytes = opened
        .metadata()
        .await
        .map_err(|e| ControlError::io(format!("reading {}", path.display()), e))?
        .len();
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::with_capacity(opened, 256 << 10));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, bytes.to_string()),
        ],
        body,
    ))
}

/// Live-migrates a running VM to another host of the cluster: the one named, one of the
/// provider named, or the best other host by its placement (avoiding a provider if asked).
/// A VM that cannot move stays where it runs.
#[utoipa::path(post, path = "/v1/vms/{vm}/migrate", params(("vm" = String, Path, description = "id or name")),
    request_body = MigrateVm, responses((status = 200, body = MigrationReport), (status = 409, body = ErrorBody),
        (status = 502, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn migrate_vm(
    State(d): D,
    caller: Caller,
    Path(key): Path<String>,
    Json(req): Json<MigrateVm>,
) -> Res<Json<MigrationReport>> {
    let vm = find_vm(&d, &caller, &key).await?;
    if d.cluster.is_none() {
        return Err(ControlError::Conflict(
            "a daemon alone has no other host to migrate to".into(),
        ));
    }
    if !d.is_mine(&vm) {
        return Err(ControlError::Conflict(format!(
            "VM {} is not on a host that is up",
            vm.name
        )));
    }
    let to = crate::cluster::migration_target(&d, &vm, &req).await?;
    Ok(Json(crate::cluster::migrate(&d, &vm, &to).await?))
}

/// Between hosts: starts a VMM here that waits for the VM to migrate in.
#[utoipa::path(post, path = "/v1/vms/{vm}/incoming", params(("vm" = String, Path, description = "id")),
    request_body = IncomingRequest, responses((status = 200, body = IncomingAnswer), (status = 403, body = ErrorBody)))]
async fn incoming_vm(
    State(d): D,
    caller: Caller,
    Path(key): Path<String>,
    Json(req): Json<IncomingRequest>,
) -> Res<Json<IncomingAnswer>> {
    caller.require_admin()?;
    let cluster = d
        .cluster
        .clone()
        .ok_or_else(|| ControlError::Conflict("a daemon alone takes no migrations".into()))?;
    let vm = find_vm(&d, &caller, &key).await?;
    let peer = auth::unhex(&req.peer_cert).ok_or_else(|| ControlError::BadRequest("peer_cert is not hex".into()))?;
    let (listen, cert) = d
        .receive_incoming(&vm.id, &crate::cluster::migration_ip(&cluster), &peer)
        .await?;
    Ok(Json(IncomingAnswer {
        listen,
        cert: auth::hex(&cert),
    }))
}

/// Between hosts: drops a VM's incoming VMM whose migration failed.
#[utoipa::path(delete, path = "/v1/vms/{vm}/incoming", params(("vm" = String, Path, description = "id")),
    responses((status = 204), (status = 403, body = ErrorBody)))]
async fn abort_incoming(State(d): D, caller: Caller, Path(key): Path<String>) -> Res<StatusCode> {
    caller.require_admin()?;
    let vm = find_vm(&d, &caller, &key).await?;
    d.abort_incoming(&vm.id).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Places no more VMs on a host (its VMs stay until they are migrated away: `xcloud host
/// drain` does both).
#[utoipa::path(post, path = "/v1/hosts/{host}/drain", params(("host" = String, Path, description = "name")),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn drain_host(State(d): D, caller: Caller, Path(host): Path<String>) -> Res<StatusCode> {
    set_draining(&d, &caller, &host, true).await
}

/// Places VMs on a drained host again.
#[utoipa::path(post, path = "/v1/hosts/{host}/undrain", params(("host" = String, Path, description = "name")),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn undrain_host(State(d): D, caller: Caller, Path(host): Path<String>) -> Res<StatusCode> {
    set_draining(&d, &caller, &host, false).await
}

async fn set_draining(d: &Daemon, caller: &Caller, host: &str, draining: bool) -> Res<StatusCode> {
    caller.require_admin()?;
    if d.cluster.is_none() {
        return Err(ControlError::Conflict(
            "a daemon alone has no other host to drain to".into(),
        ));
    }
    if !crate::cluster::hosts(d).await?.iter().any(|h| h.name == host) {
        return Err(ControlError::NotFound(format!("no host {host} is up")));
    }
    crate::cluster::set_draining(d, host, draining).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sets a host's price per hour (a provider's price change): placement and re-placement
/// use it from then on.
#[utoipa::path(post, path = "/v1/hosts/{host}/price", params(("host" = String, Path, description = "name")),
    request_body = SetPrice, responses((status = 204), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn set_host_price(
    State(d): D,
    caller: Caller,
    Path(host): Path<String>,
    Json(req): Json<SetPrice>,
) -> Res<StatusCode> {
    caller.require_admin()?;
    if !(req.price_per_hour.is_finite() && req.price_per_hour >= 0.0) {
        return Err(ControlError::BadRequest(
            "price_per_hour is a number of at least 0".into(),
        ));
    }
    cluster_host(&d, &host).await?;
    crate::cluster::set_price(&d, &host, req.price_per_hour).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Fails unless this daemon is in a cluster with `host` up.
async fn cluster_host(d: &Daemon, host: &str) -> Res<()> {
    if d.cluster.is_none() {
        return Err(ControlError::Conflict("a daemon alone has no other host".into()));
    }
    if !crate::cluster::hosts(d).await?.iter().any(|h| h.name == host) {
        return Err(ControlError::NotFound(format!("no host {host} is up")));
    }
    Ok(())
}

fn threshold_of(q: &ReplacementQuery) -> Res<f64> {
    let t = q.threshold.unwrap_or(0.2);
    if (0.0..1.0).contains(&t) {
        Ok(t)
    } else {
        Err(ControlError::BadRequest(
            "threshold is a share from 0 to below 1".into(),
        ))
    }
}

async fn plan(d: &Daemon, threshold: f64) -> Res<Replacement> {
    if d.cluster.is_none() {
        return Err(ControlError::Conflict("a daemon alone has no other host".into()));
    }
    let moves = crate::cluster::replacement_plan(d, threshold).await?;
    Ok(Replacement {
        threshold,
        saving_per_hour: moves.iter().map(|m| m.saving_per_hour).sum(),
        moves,
        results: Vec::new(),
    })
}

/// The re-placement plan (a dry run): the running VMs whose CPU would cost more than
/// `threshold` less on another host they fit, where to, and the saving.
#[utoipa::path(get, path = "/v1/replacement", params(ReplacementQuery),
    responses((status = 200, body = Replacement), (status = 403, body = ErrorBody)))]
async fn replacement_plan(State(d): D, caller: Caller, Query(q): Query<ReplacementQuery>) -> Res<Json<Replacement>> {
    caller.require_admin()?;
    Ok(Json(plan(&d, threshold_of(&q)?).await?))
}

/// Carries the re-placement plan out by live migration, one VM after another; a VM that
/// cannot move stays where it runs and its result says why.
#[utoipa::path(post, path = "/v1/replacement", params(ReplacementQuery),
    responses((status = 200, body = Replacement), (status = 403, body = ErrorBody)))]
async fn carry_out_replacement(
    State(d): D,
    caller: Caller,
    Query(q): Query<ReplacementQuery>,
) -> Res<Json<Replacement>> {
    caller.require_admin()?;
    let mut plan = plan(&d, threshold_of(&q)?).await?;
    plan.results = crate::cluster::replace(&d, &plan.moves).await?;
    Ok(Json(plan))
}

/// The hosts of the cloud (alone: this one).
#[utoipa::path(get, path = "/v1/hosts", responses((status = 200, body = Vec<Host>)))]
async fn list_hosts(State(d): D, _caller: Caller) -> Res<Json<Vec<Host>>> {
    let vms: Vec<Vm> = d.store.list(Table::Vms).await?;
    let c = &d.config;
    // Alone, this host decides; in a cluster, the host elected.
    let scheduler = match &d.cluster {
        Some(_) => Some(crate::cluster::scheduler_name(&d).await.unwrap_or_default()),
        None => None,
    };
    let records = if d.cluster.is_some() {
        crate::cluster::hosts(&d).await?
    } else {
        vec![crate::model::HostRecord {
            name: c.host_name.clone(),
            provider: c.provider.clone(),
            region: c.region.clone(),
            price_per_hour: c.price_per_hour,
            cpus: crate::host::cpus(),
            mem_mib: crate::host::mem_mib(),
            api: String::new(),
            cert: String::new(),
            since: 0,
            state: "up".into(),
        }]
    };
    let mut hosts: Vec<Host> = records
        .into_iter()
        .map(|r| Host {
            scheduler: scheduler.as_deref().is_none_or(|s| s == r.name),
            name: r.name,
            provider: r.provider,
            region: r.region,
            price_per_hour: r.price_per_hour,
            cpus: r.cpus,
            mem_mib: r.mem_mib,
            vcpus_used: 0,
            mem_mib_used: 0,
            vms: 0,
            state: r.state,
            api: Some(r.api).filter(|a| !a.is_empty()),
        })
        .collect();
    for vm in &vms {
        let Some(name) = &vm.host else { continue };
        let i = match hosts.iter().position(|h| h.name == *name) {
            Some(i) => i,
            None => {
                // VMs name it but it no longer renews its lease.
                hosts.push(Host {
                    name: name.clone(),
                    provider: String::new(),
                    region: String::new(),
                    price_per_hour: 0.0,
                    cpus: 0,
                    mem_mib: 0,
                    vcpus_used: 0,
                    mem_mib_used: 0,
                    vms: 0,
                    state: "lost".into(),
                    api: None,
                    scheduler: false,
                });
                hosts.len() - 1
            }
        };
        hosts[i].vcpus_used += vm.vcpus;
        hosts[i].mem_mib_used += vm.mem_mib;
        hosts[i].vms += 1;
    }
    hosts.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(hosts))
}

/// What the caller's VMs used and cost (an admin's: every tenant's), from the usage records,
/// added up by VM, tenant, provider, region, host, type or hour, over whole hours.
#[utoipa::path(get, path = "/v1/usage", params(UsageQuery),
    responses((status = 200, body = Usage), (status = 400, body = ErrorBody)))]
async fn usage(State(d): D, caller: Caller, Query(query): Query<UsageQuery>) -> Res<Json<Usage>> {
    Ok(Json(
        crate::meter::report(&d, &query, |tenant| caller.may_touch(tenant)).await?,
    ))
}

/// What happens to the caller's resources, as server-sent events (`event:` the kind,
/// `data:` the event as JSON), from the moment of the request on.
#[utoipa::path(get, path = "/v1/events",
    responses((status = 200, content_type = "text/event-stream", body = Event)))]
async fn events(State(d): D, caller: Caller) -> impl IntoResponse {
    let stream = tokio_stream::wrappers::BroadcastStream::new(d.subscribe()).filter_map(move |item| {
        let event = match item {
            Ok(e) if caller.may_touch(&e.tenant) => e,
            Ok(_) => return None,
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                return Some(Ok::<_, std::convert::Infallible>(
                    axum::response::sse::Event::default()
                        .event("lagged")
                        .data(format!("{n} events were dropped: this reader was too slow")),
                ))
            }
        };
        let data = serde_json::to_string(&event).unwrap_or_default();
        Some(Ok(axum::response::sse::Event::default().event(event.kind).data(data)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_x86_64_executables_pass_the_elf_check() {
        let mut head = vec![0u8; 64];
        head[..4].copy_from_slice(b"\x7fELF");
        head[4] = 2;
        head[5] = 1;
        head[16] = 2;
        head[18] = 62;
        assert!(check_elf(&head).is_ok());
        assert!(check_elf(&head[..63]).is_err());
        let mut arm = head.clone();
        arm[18] = 183;
        assert!(check_elf(&arm).is_err());
        let mut shared = head.clone();
        shared[16] = 3;
        assert!(check_elf(&shared).is_err());
        assert!(check_elf(&[b'#'; 64]).is_err());
    }

    #[test]
    fn the_openapi_document_names_every_route() {
        let doc = serde_json::to_value(ApiDoc::openapi()).expect("json");
        let paths = doc["paths"].as_object().expect("paths");
        for p in [
            "/v1/vms",
            "/v1/vms/{vm}/snapshots",
            "/v1/images",
            "/v1/events",
            "/v1/usage",
            "/v1/groups",
            "/v1/groups/{group}",
        ] {
            assert!(paths.contains_key(p), "{p}");
        }
    }
}
