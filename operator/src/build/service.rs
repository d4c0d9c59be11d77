//! Services: the app's, and per store a headless one (StatefulSet identity) and a client one. Pure.

use super::names::{self, Store, APP};
use super::CellContext;
use cellplane_cells::crd::Expose;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

fn port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

pub fn app(ctx: &CellContext) -> Service {
    Service {
        metadata: ctx.meta(names::app(ctx.name), APP),
        spec: Some(ServiceSpec {
            selector: Some(ctx.selector(APP)),
            ports: Some(vec![port("http", ctx.spec.app.port)]),
            type_: (ctx.spec.app.expose == Expose::LoadBalancer).then(|| "LoadBalancer".into()),
            ..Default::default()
        }),
        status: None,
    }
}

pub fn headless(ctx: &CellContext, store: Store) -> Service {
    Service {
        metadata: ctx.meta(names::headless(ctx.name, store), store.component()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(ctx.selector(store.component())),
            ports: Some(vec![port(store.component(), store.port())]),
            publish_not_ready_addresses: Some(true),
            ..Default::default()
        }),
        status: None,
    }
}

pub fn client(ctx: &CellContext, store: Store) -> Service {
    Service {
        metadata: ctx.meta(names::store(ctx.name, store), store.component()),
        spec: Some(ServiceSpec {
            selector: Some(ctx.selector(store.component())),
            ports: Some(vec![port(store.component(), store.port())]),
            ..Default::default()
        }),
        status: None,
    }
}
