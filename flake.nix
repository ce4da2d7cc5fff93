{
  description = "glo: Generative Latent Optimization for Stable Diffusion VAE latents";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.05";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in {
      # `nix develop`: Python 3.11 and make; the venv is built by the same steps as the README
      # (torch==2.13.0 alone first, then the package with its test extras). CPU; no CUDA set-up here.
      devShells = forAll (pkgs: {
        default = pkgs.mkShell {
          packages = [ pkgs.python311 pkgs.gnumake pkgs.git ];
          shellHook = ''
            export LD_LIBRARY_PATH=${pkgs.stdenv.cc.cc.lib}/lib:$LD_LIBRARY_PATH
            make venv
            source .venv/bin/activate
          '';
        };
      });
    };
}
