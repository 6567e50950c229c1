//! gRPC server reflection of the API, in both protocol versions: `grpc.reflection.v1`
//! (grpcurl, recent clients) and `grpc.reflection.v1alpha` (what Python's
//! grpcio-reflection and older tools speak). Each version describes the API and both
//! reflection services, so a client of either sees everything the server offers.

use tonic_reflection::server::Builder;

fn configured() -> Builder<'static> {
    Builder::configure()
        .register_encoded_file_descriptor_set(sluice_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .include_reflection_service(false)
}

/// The reflection services (v1 and v1alpha) describing `sluice.v1`.
pub fn reflection_routes() -> tonic::service::Routes {
    let v1 = configured()
        .build_v1()
        .expect("the API's descriptor set is valid");
    let v1alpha = configured()
        .build_v1alpha()
        .expect("the API's descriptor set is valid");
    tonic::service::Routes::new(v1).add_service(v1alpha)
}
